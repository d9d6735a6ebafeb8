from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from blindtune.encoding import (
    collate_pairs,
    continuation_logprobs,
    continuation_loss,
    encode_pair,
    packs_sequences,
    shared_prompt_logprobs,
    shares_prompts,
)
from blindtune.models.loading import LoadedModel, tiny_model
from blindtune.models.soft_prompt import SoftPromptModel


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny-model ops are too small to gain from threads, and on a busy CPU threads waiting for each
    other make them fifty times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_model(num_layers=2, hidden_size=64, seed=1)


def naive_logprobs(model: torch.nn.Module, ids: list[int], start: int) -> torch.Tensor:
    """Reference: full logits of the unpadded sequence, then the continuation tokens' log-probs."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return torch.stack([logprobs[t - 1, ids[t]] for t in range(start, len(ids))])


def test_encode_pair_tokenizes_parts_separately(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    ids, start = encode_pair(tokenizer, "Category:", " animal", max_length=64)
    assert ids[:start] == tokenizer("Category:")["input_ids"]
    assert ids[start:] == tokenizer(" animal", add_special_tokens=False)["input_ids"]


def test_encode_pair_truncates_prompt_from_the_left(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    prompt = " ".join(f"word{i}" for i in range(50))
    full, full_start = encode_pair(tokenizer, prompt, " the end", max_length=1000)
    ids, start = encode_pair(tokenizer, prompt, " the end", max_length=10)
    assert len(ids) == 10
    assert ids[start:] == full[full_start:]
    assert ids[:start] == full[full_start - start : full_start]


def test_encode_pair_rejects_continuation_longer_than_max_length(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="no room"):
        encode_pair(tiny.tokenizer, "Q:", " one two three four five", max_length=3)
    with pytest.raises(ValueError, match="no tokens"):
        encode_pair(tiny.tokenizer, "Q:", "", max_length=3)


def test_encode_pair_can_cut_a_long_continuation_instead(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    prompt = " ".join(f"word{i}" for i in range(30))
    solution = " ".join(f"step{i}" for i in range(40))
    full, full_start = encode_pair(tokenizer, prompt, solution, max_length=1000)
    ids, start = encode_pair(tokenizer, prompt, solution, max_length=20, cut_continuation=True)
    assert len(ids) == 20 and start == 10  # half of max_length stays for the prompt
    assert ids[start:] == full[full_start : full_start + 10]  # the solution's beginning
    assert ids[:start] == full[full_start - 10 : full_start]  # the prompt's end
    short = encode_pair(tokenizer, prompt, " the end", max_length=20, cut_continuation=True)[0]
    assert short == encode_pair(tokenizer, prompt, " the end", max_length=20)[0] and len(short) == 20


def test_collate_pairs_pads_right() -> None:
    batch = collate_pairs([([5, 6, 7], 2), ([8, 9, 10, 11, 12], 3)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.spans == [(2, 3), (3, 5)]
    assert batch.num_continuation_tokens == 3
    with pytest.raises(ValueError, match="outside"):
        collate_pairs([([5, 6], 0)], pad_id=0)


def test_continuation_logprobs_match_full_logits(tiny: LoadedModel) -> None:
    pairs = [
        encode_pair(tiny.tokenizer, prompt, continuation, max_length=64)
        for prompt, continuation in [
            ("Definition: a large cat.\nCategory:", " animal"),
            ("Q: 2+2?", " The answer is 4."),
            ("Hi", " there, how are you doing today?"),
        ]
    ]
    batch = collate_pairs(pairs, pad_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        got = continuation_logprobs(tiny.model, batch)
        for row, (ids, start) in enumerate(pairs):
            assert got[row].shape == (len(ids) - start,)
            torch.testing.assert_close(got[row], naive_logprobs(tiny.model, ids, start), atol=1e-4, rtol=0)


def test_continuation_loss_is_token_weighted_and_differentiable(tiny: LoadedModel) -> None:
    pairs = [
        encode_pair(tiny.tokenizer, "Q: x?", " a b c d e f", max_length=64),
        encode_pair(tiny.tokenizer, "Q: y?", " z", max_length=64),
    ]
    batch = collate_pairs(pairs, pad_id=tiny.tokenizer.pad_token_id)
    tiny.model.train()
    try:
        loss = continuation_loss(tiny.model, batch)
        loss.backward()
        assert tiny.model.get_input_embeddings().weight.grad is not None
    finally:
        tiny.model.eval()
        tiny.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        expected = -torch.cat([naive_logprobs(tiny.model, ids, start) for ids, start in pairs]).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=0)


def test_packed_rows_score_and_train_as_the_padded_batch(tiny: LoadedModel) -> None:
    pairs = [
        encode_pair(tiny.tokenizer, "Definition: a large cat.\nCategory:", " animal", max_length=64),
        encode_pair(tiny.tokenizer, "Q: 2+2?", " The answer is 4.", max_length=64),
        encode_pair(tiny.tokenizer, "Hi", " there", max_length=64),
    ]
    batch = collate_pairs(pairs, pad_id=tiny.tokenizer.pad_token_id)
    assert packs_sequences(tiny.model)
    gradients = []
    for packed in (False, True):
        loss = continuation_loss(tiny.model, batch, packed=packed)
        loss.backward()
        gradients.append([p.grad.clone() for p in tiny.model.parameters() if p.grad is not None])
        tiny.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for row, logprobs in enumerate(continuation_logprobs(tiny.model, batch, packed=packed)):
                torch.testing.assert_close(logprobs, naive_logprobs(tiny.model, *pairs[row]), atol=1e-4, rtol=0)
    assert len(gradients[0]) == len(gradients[1]) > 0
    for padded, packed in zip(*gradients, strict=True):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)


def test_a_soft_prompt_model_is_not_packed() -> None:
    """Its decoder puts the prompt in front of the row and builds its own mask: packed rows would see
    each other, so the check refuses and training falls back to the padded batch."""
    model = tiny_model(num_layers=2, hidden_size=64, seed=2)
    prompted = SoftPromptModel(model.model, length=3)
    assert not packs_sequences(prompted)
    texts = [("Q: x?", " a b"), ("Q: y z?", " z")]
    pairs = [encode_pair(model.tokenizer, prompt, target, 64) for prompt, target in texts]
    batch = collate_pairs(pairs, pad_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(
            continuation_loss(prompted, batch, packed=True), continuation_loss(prompted, batch), atol=0, rtol=0
        )


def test_options_scored_on_a_shared_prompt_match_each_sequence_alone(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    examples = [("Definition: a seaport\nWord:", [" Lobito", " resinoid", " Orange"]), ("Q: x?", [" a b c", " z"])]
    prompts = [tokenizer(prompt)["input_ids"] for prompt, _ in examples]
    options = [[tokenizer(option, add_special_tokens=False)["input_ids"] for option in row] for _, row in examples]
    assert shares_prompts(tiny.model)
    with torch.no_grad():
        scored = shared_prompt_logprobs(tiny.model, prompts, options)
    for prompt, choices, scores in zip(prompts, options, scored, strict=True):
        assert len(scores) == len(choices)
        for choice, logprobs in zip(choices, scores, strict=True):
            expected = naive_logprobs(tiny.model, [*prompt, *choice], len(prompt))
            torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=0)


def test_a_soft_prompt_model_scores_each_option_alone() -> None:
    model = tiny_model(num_layers=2, hidden_size=64, seed=3)
    assert not shares_prompts(SoftPromptModel(model.model, length=3))
