"""Evaluate a causal LM on task examples: option log-likelihood, held-out perplexity, generated answers.

Multiple-choice scoring follows lm-evaluation-harness (the sum of the option tokens' log-probs given the
prompt, optionally divided by the option's length in characters like its acc_norm), so accuracies are
comparable with published numbers. Sequences are batched and sorted by length, the options of one
prompt are scored after a single pass of that prompt (`encoding.shared_prompt_logprobs`), and the LM
head (a large share of a small model's cost) is applied only where a score is read.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from blindtune.data.gsm8k import extract_final_number
from blindtune.data.task import Example
from blindtune.encoding import (
    collate_pairs,
    continuation_logprobs,
    encode_pair,
    last_hidden_states,
    model_device,
    pad_right,
    shared_prompt_logprobs,
    shares_prompts,
    vocab_logprobs,
)

T = TypeVar("T")


@dataclass
class ChoiceEval:
    accuracy: float
    num_examples: int
    predictions: list[int]  # index of the chosen option, per example
    seconds: float
    correct: list[bool] = field(default_factory=list)  # per example: the chosen option is the label
    # Per example and option: the summed log-probability of the option tokens (before any normalisation).
    loglikelihoods: list[list[float]] = field(default_factory=list)


@dataclass
class GenerationEval:
    accuracy: float
    num_examples: int
    predictions: list[str]  # the generated continuation, per example
    seconds: float
    correct: list[bool] = field(default_factory=list)  # per example: the final number is the answer


def evaluate_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    length_normalized: bool = False,
    max_length: int = 512,
    progress: bool = True,
    desc: str = "eval",
) -> ChoiceEval:
    """Accuracy of picking the option with the highest log-likelihood given the prompt.

    When every option is one distinct token, one forward pass per example (over the prompt alone)
    scores all its options; otherwise each (prompt + option) sequence is scored. `batch_size` is the
    number of sequences per forward pass.
    """
    _check_choice_examples(examples)
    started = time.perf_counter()
    option_tokens = _single_token_options(tokenizer, examples)
    total = len(examples) if option_tokens is not None else sum(len(example.choices) for example in examples)
    with (
        tqdm(total=total, desc=desc, unit="seq", disable=not progress) as bar,
        _eval_mode(model),
        torch.inference_mode(),
    ):
        if option_tokens is not None:
            loglikelihoods = _single_token_loglikelihoods(
                model, tokenizer, examples, option_tokens, batch_size, max_length, bar
            )
        else:
            loglikelihoods = _general_loglikelihoods(model, tokenizer, examples, batch_size, max_length, bar)
    predictions = [
        _argmax(_normalize(scores, example.choices) if length_normalized else scores)
        for scores, example in zip(loglikelihoods, examples, strict=True)
    ]
    correct = [prediction == example.label for prediction, example in zip(predictions, examples, strict=True)]
    return ChoiceEval(
        accuracy=sum(correct) / len(examples),
        num_examples=len(examples),
        predictions=predictions,
        seconds=time.perf_counter() - started,
        loglikelihoods=loglikelihoods,
        correct=correct,
    )


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = True,
) -> float:
    """exp of the mean negative log-likelihood per token over `texts` (each truncated to `max_length`).

    Every token but a text's first is predicted and counts once, so long texts weigh more than short ones.
    """
    sequences = [list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]) for text in texts]
    sequences = sorted((ids for ids in sequences if len(ids) >= 2), key=len, reverse=True)
    if not sequences:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    total_nll, total_tokens = 0.0, 0
    with (
        tqdm(total=len(sequences), desc="perplexity", unit="seq", disable=not progress) as bar,
        _eval_mode(model),
        torch.inference_mode(),
    ):
        for chunk in _chunks(sequences, batch_size):
            batch = collate_pairs([(ids, 1) for ids in chunk], _pad_id(tokenizer))
            total_nll -= torch.cat(continuation_logprobs(model, batch)).sum().item()
            total_tokens += batch.num_continuation_tokens
            bar.update(len(chunk))
    return math.exp(total_nll / total_tokens)


def evaluate_generation(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> GenerationEval:
    """Greedy-decode each prompt; correct when the final number of the output equals `example.answer`."""
    if not examples:
        raise ValueError("no examples to evaluate")
    for index, example in enumerate(examples):
        if example.answer is None:
            raise ValueError(f"example {index} has no answer to compare the generation with")
    started = time.perf_counter()
    # Similar lengths in a batch waste less on padding; the character count is a cheap proxy for tokens.
    order = sorted(range(len(examples)), key=lambda index: len(examples[index].prompt))
    generated: dict[int, str] = {}
    padding_side = tokenizer.padding_side
    # Left padding puts every prompt's last token at the same position, where generation continues.
    tokenizer.padding_side = "left"
    try:
        with (
            tqdm(total=len(examples), desc="generate", unit="ex", disable=not progress) as bar,
            _eval_mode(model),
            torch.inference_mode(),
        ):
            for chunk in _chunks(order, batch_size):
                texts = _generate(model, tokenizer, [examples[index].prompt for index in chunk], max_new_tokens)
                generated.update(zip(chunk, texts, strict=True))
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = padding_side
    predictions = [generated[index] for index in range(len(examples))]
    correct = [
        extract_final_number(text) == example.answer for text, example in zip(predictions, examples, strict=True)
    ]
    return GenerationEval(
        accuracy=sum(correct) / len(examples),
        num_examples=len(examples),
        predictions=predictions,
        seconds=time.perf_counter() - started,
        correct=correct,
    )


def _check_choice_examples(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("no examples to evaluate")
    for index, example in enumerate(examples):
        if not example.choices:
            raise ValueError(f"example {index} has no choices: it is not a multiple-choice example")
        if not 0 <= example.label < len(example.choices):
            raise ValueError(f"example {index} has label {example.label} outside its {len(example.choices)} choices")


def _single_token_options(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[list[int]] | None:
    """Per example, the token of each option; None unless every option is one token, distinct per example."""
    token_of: dict[str, list[int]] = {}  # tasks reuse the same few options: tokenise each string once
    per_example = []
    for example in examples:
        tokens = []
        for choice in example.choices:
            if choice not in token_of:
                token_of[choice] = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
            if len(token_of[choice]) != 1:
                return None
            tokens.append(token_of[choice][0])
        if len(set(tokens)) != len(tokens):
            return None
        per_example.append(tokens)
    return per_example


def _single_token_loglikelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    option_tokens: list[list[int]],
    batch_size: int,
    max_length: int,
    bar: tqdm,
) -> list[list[float]]:
    """Score all options of an example from the next-token distribution after its prompt."""
    contexts = [_prompt_ids(tokenizer, example, max_length) for example in examples]
    order = sorted(range(len(examples)), key=lambda index: len(contexts[index]), reverse=True)
    loglikelihoods: list[list[float]] = [[] for _ in examples]
    for chunk in _chunks(order, batch_size):
        input_ids, attention_mask = pad_right([contexts[index] for index in chunk], _pad_id(tokenizer))
        hidden = last_hidden_states(model, input_ids, attention_mask)
        last = attention_mask.sum(dim=1) - 1
        logprobs = vocab_logprobs(model, hidden[torch.arange(len(chunk)), last.to(hidden.device)])
        for row, index in enumerate(chunk):
            loglikelihoods[index] = logprobs[row, option_tokens[index]].tolist()
        bar.update(len(chunk))
    return loglikelihoods


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> list[int]:
    """The prompt part of `encode_pair`, so the context is exactly what the general path would see."""
    ids, start = encode_pair(tokenizer, example.prompt, example.choices[0], max_length)
    return ids[:start]


def _general_loglikelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    bar: tqdm,
) -> list[list[float]]:
    """Score every option given its prompt: the prompt run once for all its options where the model
    allows it (`shares_prompts`) and the example fits in `max_length` untruncated; otherwise every
    (prompt + option) sequence on its own, sequences of different examples sharing batches."""
    loglikelihoods = [[0.0] * len(example.choices) for example in examples]
    shared: list[tuple[int, list[int], list[list[int]]]] = []
    requests = []
    sharing = shares_prompts(model)
    for index, example in enumerate(examples):
        pairs = [encode_pair(tokenizer, example.prompt, choice, max_length) for choice in example.choices]
        prompt = pairs[0][0][: pairs[0][1]]
        choices = [ids[start:] for ids, start in pairs]
        # The prompt is the same for every option unless one of them made encode_pair cut it.
        untruncated = all(ids[:start] == prompt for ids, start in pairs)
        if sharing and untruncated and len(prompt) + sum(map(len, choices)) <= max_length:
            shared.append((index, prompt, choices))
        else:
            requests += [(index, option, pair) for option, pair in enumerate(pairs)]
    shared.sort(key=lambda item: len(item[1]) + sum(map(len, item[2])), reverse=True)
    # `batch_size` counts sequences: an example brings one per option.
    per_batch = max(1, batch_size // max((len(choices) for _, _, choices in shared), default=1))
    for chunk in _chunks(shared, per_batch):
        scores = shared_prompt_logprobs(model, [prompt for _, prompt, _ in chunk], [choices for _, _, choices in chunk])
        for (index, _, _), options in zip(chunk, scores, strict=True):
            loglikelihoods[index] = [logprobs.sum().item() for logprobs in options]
        bar.update(sum(len(choices) for _, _, choices in chunk))
    requests.sort(key=lambda request: len(request[2][0]), reverse=True)
    for batch_requests in _chunks(requests, batch_size):
        batch = collate_pairs([pair for _, _, pair in batch_requests], _pad_id(tokenizer))
        for (index, option, _), logprobs in zip(batch_requests, continuation_logprobs(model, batch), strict=True):
            loglikelihoods[index][option] = logprobs.sum().item()
        bar.update(len(batch_requests))
    return loglikelihoods


def _generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[str]:
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model_device(model))
    generator: Any = model  # transformers types generate() against a private protocol of its own
    output = generator.generate(
        **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=_pad_id(tokenizer)
    )
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items (itertools.batched needs Python 3.12)."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _normalize(loglikelihoods: list[float], choices: Sequence[str]) -> list[float]:
    """Per-character log-likelihood (lm-evaluation-harness acc_norm): longer options are not penalised."""
    return [score / len(choice) for score, choice in zip(loglikelihoods, choices, strict=True)]


def _argmax(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores, like numpy


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Padding is masked and never scored, so any id works when a tokenizer defines no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode the caller left it in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
