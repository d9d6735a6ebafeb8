"""Instruction data scored by the test responses' likelihood: mean token negative log-likelihood (and
its perplexity) of each gold response given its prompt, the response tokens only, every token once.
When asked, also by generation: exact match and ROUGE-L F1 (longest common subsequence of words) of
the greedy response against the gold one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from blindtune.data.task import Example
from blindtune.encoding import collate_pairs, continuation_logprobs, encode_pair
from blindtune.eval.generation import generate_texts
from blindtune.eval.scoring import _chunks, _eval_mode, _pad_id

DEFAULT_MAX_LENGTH = 512


@dataclass
class ResponseEval:
    nll: float  # mean negative log-likelihood per response token (nats)
    num_examples: int
    num_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def evaluate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
    desc: str = "response NLL",
) -> ResponseEval:
    """Mean token NLL of each example's target (the response) given its prompt (the chat template applies
    to chat prompts); a response longer than `max_length` allows keeps its beginning."""
    if not examples:
        raise ValueError("no examples to evaluate")
    pairs = [encode_pair(tokenizer, e.prompt, e.target, max_length, cut_continuation=True) for e in examples]
    pairs.sort(key=lambda pair: len(pair[0]), reverse=True)
    total_nll, total_tokens = 0.0, 0
    with (
        tqdm(total=len(pairs), desc=desc, unit="seq", disable=not progress) as bar,
        _eval_mode(model),
        torch.inference_mode(),
    ):
        for chunk in _chunks(pairs, batch_size):
            batch = collate_pairs(chunk, _pad_id(tokenizer))
            total_nll -= torch.cat(continuation_logprobs(model, batch)).double().sum().item()
            total_tokens += batch.num_continuation_tokens
            bar.update(len(chunk))
    return ResponseEval(nll=total_nll / total_tokens, num_examples=len(examples), num_tokens=total_tokens)


@dataclass
class GeneratedEval:
    exact_match: float  # share of greedy responses equal to the gold one (whitespace-normalised)
    rouge_l: float  # mean ROUGE-L F1 over examples
    predictions: list[str]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on whitespace words: 2PR / (P + R) of their longest common subsequence."""
    predicted, gold = prediction.split(), reference.split()
    if not predicted or not gold:
        return float(predicted == gold)
    previous = [0] * (len(gold) + 1)
    for word in predicted:
        current = [0]
        for index, other in enumerate(gold):
            current.append(previous[index] + 1 if word == other else max(previous[index + 1], current[index]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def evaluate_generated_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> GeneratedEval:
    """Greedy responses (the chat template applies) scored by exact match and ROUGE-L against the targets."""
    predictions = generate_texts(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        desc="generate responses",
    )
    exact = [" ".join(p.split()) == " ".join(e.target.split()) for p, e in zip(predictions, examples, strict=True)]
    overlaps = [rouge_l(p, e.target) for p, e in zip(predictions, examples, strict=True)]
    return GeneratedEval(sum(exact) / len(exact), sum(overlaps) / len(overlaps), predictions)
