from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from blindtune.encoding import (
    collate_pairs,
    continuation_logprobs,
    continuation_loss,
    encode_pair,
)
from blindtune.models.loading import LoadedModel, tiny_model


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
