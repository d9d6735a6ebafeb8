from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from blindtune.data.task import Example
from blindtune.eval import scoring
from blindtune.eval.scoring import evaluate_choices, evaluate_generation, perplexity
from blindtune.models.loading import LoadedModel, load_model, tiny_model

CATEGORIES = (" animal", " plant", " food", " person", " location")
SINGLE_TOKEN = [
    Example(f"Definition: {text}\nCategory:", CATEGORIES[index % 5], CATEGORIES, label=index % 5)
    for index, text in enumerate(
        [
            "a large wild cat with a mane",
            "a tall woody perennial with a trunk",
            "a baked loaf made from flour and water",
            "someone who writes books for a living",
            "a city on the bank of a wide river in the north of a cold country",
            "a small domesticated feline",
            "a flowering shrub grown in gardens",
            "a sweet frozen dessert",
            "a member of a legislative assembly",
            "the capital of a small island nation",
        ]
    )
]
MULTI_TOKEN = [
    Example(prompt=f"Q: {question}\nA:", target=options[0], choices=options, label=0)
    for question, options in [
        ("What do bees make?", (" honey", " paper cups and plates", " nothing at all")),
        ("Where is Paris?", (" in France", " on the moon", " under the sea, near a reef")),
        ("What colour is the sky on a clear day?", (" blue", " green with purple stripes")),
        ("How many legs does a spider have?", (" eight", " six", " twelve or so", " none")),
    ]
]


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
    return tiny_model(num_layers=2, hidden_size=64, seed=3)


def naive_loglikelihoods(loaded: LoadedModel, example: Example) -> list[float]:
    """Reference: full logits of each unpadded prompt+option sequence, summed over the option tokens."""
    scores = []
    for choice in example.choices:
        prompt_ids = loaded.tokenizer(example.prompt)["input_ids"]
        option_ids = loaded.tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([prompt_ids + option_ids])).logits[0]
        logprobs = logits.float().log_softmax(-1)
        start = len(prompt_ids)
        scores.append(sum(logprobs[start + i - 1, token].item() for i, token in enumerate(option_ids)))
    return scores


@pytest.mark.parametrize("examples", [SINGLE_TOKEN, MULTI_TOKEN], ids=["single-token", "multi-token"])
def test_loglikelihoods_match_naive_reference(tiny: LoadedModel, examples: list[Example]) -> None:
    result = evaluate_choices(tiny.model, tiny.tokenizer, examples, batch_size=3, progress=False)
    for got, example in zip(result.loglikelihoods, examples, strict=True):
        assert got == pytest.approx(naive_loglikelihoods(tiny, example), abs=1e-4)
    expected = [max(range(len(s)), key=s.__getitem__) for s in result.loglikelihoods]
    assert result.predictions == expected
    assert result.accuracy == sum(p == e.label for p, e in zip(expected, examples, strict=True)) / len(examples)
    assert result.num_examples == len(examples)


def test_known_answer_wins_when_its_output_row_points_along_the_hidden_state() -> None:
    loaded = tiny_model(num_layers=2, hidden_size=64, seed=4)
    example = SINGLE_TOKEN[0]
    gold = loaded.tokenizer(example.choices[2], add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([loaded.tokenizer(example.prompt)["input_ids"]])
    assert gold not in ids  # so changing its (tied) embedding row leaves the prompt's hidden states alone
    with torch.no_grad():
        hidden = loaded.model.get_decoder()(input_ids=ids).last_hidden_state[0, -1]
        loaded.model.get_output_embeddings().weight[gold] = 100 * hidden / hidden.norm()
    labelled = Example(example.prompt, example.choices[2], example.choices, label=2)
    result = evaluate_choices(loaded.model, loaded.tokenizer, [labelled], progress=False)
    assert result.predictions == [2]
    assert result.accuracy == 1.0


@pytest.mark.parametrize("examples", [SINGLE_TOKEN, MULTI_TOKEN], ids=["single-token", "multi-token"])
def test_batch_size_does_not_change_results(tiny: LoadedModel, examples: list[Example]) -> None:
    one = evaluate_choices(tiny.model, tiny.tokenizer, examples, batch_size=1, progress=False)
    seven = evaluate_choices(tiny.model, tiny.tokenizer, examples, batch_size=7, progress=False)
    assert one.predictions == seven.predictions
    for a, b in zip(one.loglikelihoods, seven.loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_fast_path_agrees_with_general_path(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = evaluate_choices(tiny.model, tiny.tokenizer, SINGLE_TOKEN, batch_size=4, progress=False)
    monkeypatch.setattr(scoring, "_single_token_options", lambda tokenizer, examples: None)
    general = evaluate_choices(tiny.model, tiny.tokenizer, SINGLE_TOKEN, batch_size=4, progress=False)
    assert fast.predictions == general.predictions
    for a, b in zip(fast.loglikelihoods, general.loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_length_normalisation_can_change_the_decision(tiny: LoadedModel) -> None:
    # A random model gives every token about -log(vocab): the one-token option has the higher sum, the
    # many-token long option the higher log-likelihood per character.
    example = Example("Q: pick one\nA:", " x", (" x", " internationalization and localization"), label=0)
    raw = evaluate_choices(tiny.model, tiny.tokenizer, [example], progress=False)
    norm = evaluate_choices(tiny.model, tiny.tokenizer, [example], length_normalized=True, progress=False)
    short, long = raw.loglikelihoods[0]
    assert short > long and short / len(example.choices[0]) < long / len(example.choices[1])
    assert raw.predictions == [0] and raw.accuracy == 1.0
    assert norm.predictions == [1] and norm.accuracy == 0.0
    assert norm.loglikelihoods == raw.loglikelihoods  # reported before normalisation


def test_prompts_are_truncated_to_max_length(tiny: LoadedModel) -> None:
    long_prompt = Example(" ".join(["word"] * 200) + "\nCategory:", " animal", CATEGORIES, label=0)
    result = evaluate_choices(tiny.model, tiny.tokenizer, [long_prompt], max_length=16, progress=False)
    assert len(result.loglikelihoods[0]) == len(CATEGORIES)


def test_training_mode_is_restored(tiny: LoadedModel) -> None:
    tiny.model.train()
    try:
        evaluate_choices(tiny.model, tiny.tokenizer, SINGLE_TOKEN[:2], progress=False)
        assert tiny.model.training
    finally:
        tiny.model.eval()
    evaluate_choices(tiny.model, tiny.tokenizer, SINGLE_TOKEN[:2], progress=False)
    assert not tiny.model.training


def test_invalid_examples_are_rejected(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="no examples"):
        evaluate_choices(tiny.model, tiny.tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="no choices"):
        evaluate_choices(tiny.model, tiny.tokenizer, [Example("Q: 1+1?", " 2", answer="2")], progress=False)
    with pytest.raises(ValueError, match="label"):
        evaluate_choices(tiny.model, tiny.tokenizer, [Example("Q", " a", (" a", " b"), label=2)], progress=False)


def test_perplexity_is_exp_of_token_weighted_nll(tiny: LoadedModel) -> None:
    texts = ["The cat sat on the mat.", "A much longer sentence about rivers, hills and the sea.", "Hi", "x"]
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tiny.tokenizer(text)["input_ids"]
        with torch.no_grad():
            logprobs = tiny.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        total_nll -= sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)))
        total_tokens += len(ids) - 1
    got = perplexity(tiny.model, tiny.tokenizer, texts, batch_size=3, progress=False)
    assert got == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    with pytest.raises(ValueError, match="two or more tokens"):
        perplexity(tiny.model, tiny.tokenizer, ["x"], progress=False)


def test_generation_scores_the_extracted_answer(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in extractor: the test checks batching and scoring, not the GSM8K answer format.
    monkeypatch.setattr(scoring, "extract_final_number", lambda text: "42")
    examples = [
        Example("Question: what is six times seven?\nAnswer:", " 42", answer="42"),
        Example("Question: 3+4?\nAnswer:", " 7", answer="7"),
        Example("Question: a much longer question about apples and oranges?\nAnswer:", " 42", answer="42"),
    ]
    batched = evaluate_generation(tiny.model, tiny.tokenizer, examples, max_new_tokens=4, batch_size=3, progress=False)
    single = evaluate_generation(tiny.model, tiny.tokenizer, examples, max_new_tokens=4, batch_size=1, progress=False)
    assert batched.accuracy == pytest.approx(2 / 3)
    assert batched.num_examples == 3
    assert batched.predictions == single.predictions
    assert all(isinstance(text, str) and text for text in batched.predictions)
    assert tiny.tokenizer.padding_side == "right"
    with pytest.raises(ValueError, match="no answer"):
        evaluate_generation(tiny.model, tiny.tokenizer, [Example("Q", " a")], progress=False)


@pytest.mark.slow
def test_real_model_scores_above_chance_and_fast_path_matches_general_path() -> None:
    from blindtune.data.wordnet import load_noun_supersense

    loaded = load_model()
    examples = load_noun_supersense(None, 0).test[:200]
    result = evaluate_choices(loaded.model, loaded.tokenizer, examples, progress=False)
    assert result.num_examples == 200
    # Chance is 0.10 over 10 balanced categories; SmolLM2-135M zero-shot is about 0.2-0.3.
    assert result.accuracy > 0.15
    # The fast path must agree with scoring every (prompt + option) sequence on the real model too.
    general = scoring._general_loglikelihoods(
        loaded.model, loaded.tokenizer, examples[:10], 32, 512, scoring.tqdm(disable=True)
    )
    for fast, slow in zip(result.loglikelihoods[:10], general, strict=True):
        assert fast == pytest.approx(slow, abs=1e-3)
