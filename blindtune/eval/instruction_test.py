"""Response NLL: the response tokens only, the chat template applied, and training lowers it."""

import math

import pytest
import torch

from blindtune.data import TaskKind
from blindtune.data.instruction import instruction_example
from blindtune.encoding import ChatPrompt, encode_pair, prompt_ids
from blindtune.eval.instruction import evaluate_generated_responses, evaluate_responses, rouge_l
from blindtune.eval.tasks import evaluate_examples
from blindtune.models import tiny_model
from blindtune.training import TrainConfig, train


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(num_layers=2, hidden_size=32)


def _examples(n=6):
    return [
        instruction_example({"prompt": f"Count to {i}.", "response": f"{' '.join(map(str, range(1, i + 2)))}"}, "x", i)
        for i in range(n)
    ]


def test_chat_prompts_go_through_the_chat_template(tiny):
    prompt = ChatPrompt("User: hi\nAssistant:", (("user", "hi"),))
    rendered = tiny.tokenizer.decode(prompt_ids(tiny.tokenizer, prompt))
    assert tiny.tokenizer.chat_template and "<|im_start|>assistant" in rendered and "User:" not in rendered
    tiny.tokenizer.chat_template, template = None, tiny.tokenizer.chat_template
    try:
        assert tiny.tokenizer.decode(prompt_ids(tiny.tokenizer, prompt)) == "User: hi\nAssistant:"
    finally:
        tiny.tokenizer.chat_template = template


def test_nll_is_the_mean_over_response_tokens_only(tiny):
    examples = _examples()
    result = evaluate_responses(tiny.model, tiny.tokenizer, examples, batch_size=4, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, start = encode_pair(tiny.tokenizer, example.prompt, example.target, 512)
            logits = tiny.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            total -= sum(logits[t - 1, ids[t]].item() for t in range(start, len(ids)))
            count += len(ids) - start
    assert result.num_tokens == count
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    scored = evaluate_examples(tiny.model, tiny.tokenizer, examples, TaskKind.INSTRUCTION, progress=False)
    assert scored == pytest.approx(result.nll)


def test_training_on_responses_lowers_their_nll():
    model = tiny_model(num_layers=2, hidden_size=32, seed=3)
    examples = _examples()
    before = evaluate_responses(model.model, model.tokenizer, examples, progress=False).nll
    for parameter in model.model.parameters():
        parameter.requires_grad_(True)
    train(
        model.model,
        model.tokenizer,
        examples,
        TrainConfig(steps=20, batch_size=6, learning_rate=3e-3),
        seed=0,
        progress=False,
    )
    assert evaluate_responses(model.model, model.tokenizer, examples, progress=False).nll < before - 0.5


def test_no_examples_is_an_error(tiny):
    with pytest.raises(ValueError, match="no examples"):
        evaluate_responses(tiny.model, tiny.tokenizer, [], progress=False)


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS "a c": P = R = 2/4
    assert rouge_l("the cat", "the big cat sat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("dog", "cat") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


def test_generated_responses_are_scored_against_the_targets(tiny, monkeypatch):
    import blindtune.eval.instruction as instruction

    examples = _examples(3)
    monkeypatch.setattr(instruction, "generate_texts", lambda *a, **k: [examples[0].target, "1", "nothing"])
    scored = evaluate_generated_responses(tiny.model, tiny.tokenizer, examples, progress=False)
    assert scored.exact_match == pytest.approx(1 / 3)
    assert scored.rouge_l == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)  # "1" against "1 2": P = 1, R = 1/2
    monkeypatch.undo()
    real = evaluate_generated_responses(tiny.model, tiny.tokenizer, examples[:1], max_new_tokens=3, progress=False)
    assert len(real.predictions) == 1 and 0.0 <= real.rouge_l <= 1.0
