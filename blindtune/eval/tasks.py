"""Evaluate a model on a task's test examples with the scoring its kind calls for."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example, TaskData, TaskKind
from blindtune.eval.instruction import evaluate_responses
from blindtune.eval.scoring import evaluate_choices, evaluate_generation
from blindtune.models.loading import cache_dir, model_fingerprint, written_atomically

_CACHE_VERSION = 1  # bump when scoring changes what a cached accuracy means


def evaluate_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    kind: TaskKind,
    *,
    batch_size: int = 32,
    length_normalized: bool = False,
    max_new_tokens: int = 256,
    progress: bool = True,
    desc: str = "eval",
) -> float:
    """Accuracy in [0, 1]: option log-likelihood for multiple choice, exact match for generation (of at
    most `max_new_tokens` tokens). Instruction data: the test responses' mean token NLL (lower is better)."""
    if kind is TaskKind.INSTRUCTION:
        return evaluate_responses(model, tokenizer, examples, batch_size=batch_size, progress=progress, desc=desc).nll
    correct = correct_per_example(
        model,
        tokenizer,
        examples,
        kind,
        batch_size=batch_size,
        length_normalized=length_normalized,
        max_new_tokens=max_new_tokens,
        progress=progress,
        desc=desc,
    )
    return sum(correct) / len(correct)


def correct_per_example(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    kind: TaskKind,
    *,
    batch_size: int = 32,
    length_normalized: bool = False,
    max_new_tokens: int = 256,
    progress: bool = True,
    desc: str = "eval",
) -> list[bool]:
    """Right or wrong, per example, scored as `evaluate_examples` scores it: what a paired comparison of
    two models on the same examples needs. Instruction data has no right or wrong (ValueError)."""
    if kind is TaskKind.INSTRUCTION:
        raise ValueError("instruction data is scored by its responses' mean token NLL, not right or wrong per example")
    if kind is TaskKind.GENERATION:
        return evaluate_generation(
            model, tokenizer, list(examples), max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        ).correct
    return evaluate_choices(
        model,
        tokenizer,
        list(examples),
        batch_size=batch_size,
        length_normalized=length_normalized,
        progress=progress,
        desc=desc,
    ).correct


@dataclass
class TaskEvaluator:
    """Scores any model on the same test examples: one instance per run, shared by every row."""

    task: TaskData
    limit: int | None
    batch_size: int = 32
    length_normalized: bool = False
    max_new_tokens: int = 256
    progress: bool = True
    round_limit: int | None = None  # examples scored in the rounds before the last (None: `limit`)

    def in_round(self, round_number: int, rounds: int) -> TaskEvaluator:
        """The scorer of a federated round: this one in the last round, its first `round_limit` examples before."""
        if round_number >= rounds or self.round_limit is None:
            return self
        limit = self.round_limit if self.limit is None else min(self.round_limit, self.limit)
        return dataclasses.replace(self, limit=limit)

    def __call__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, desc: str, *, reuse: bool = False
    ) -> float:
        """`reuse`: read the accuracy from the cache when this model (by weights), tokenizer, examples and
        scoring settings were scored before, and store it otherwise. Meant for the full LLM, which every
        method scores identically on a task; a trained model never repeats, so caching it only costs."""
        if not reuse:
            return self._score(model, tokenizer, desc)
        path = self._cache_path(model, tokenizer)
        if path.is_file():
            return float(json.loads(path.read_text())["accuracy"])
        accuracy = self._score(model, tokenizer, desc)
        with written_atomically(path) as temporary:  # parallel runs of a task may score the LLM at once
            temporary.write_text(json.dumps({"accuracy": accuracy, "task": self.task.name}))
        return accuracy

    def correct(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, desc: str) -> list[bool]:
        """Right or wrong on each example `__call__` scores (never cached): for paired comparisons."""
        return correct_per_example(
            model,
            tokenizer,
            self.task.test[: self.limit],
            self.task.kind,
            batch_size=self.batch_size,
            length_normalized=self.length_normalized,
            max_new_tokens=self.max_new_tokens,
            progress=self.progress,
            desc=desc,
        )

    def _cache_path(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Path:
        digest = hashlib.sha256()
        settings = [_CACHE_VERSION, self.task.kind.value, self.batch_size, self.length_normalized, self.max_new_tokens]
        digest.update(json.dumps(settings).encode())
        digest.update(json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())]).encode())
        digest.update(json.dumps([tokenizer.chat_template, tokenizer.padding_side]).encode())
        digest.update(json.dumps([asdict(e) for e in self.task.test[: self.limit]]).encode())
        digest.update(model_fingerprint(model).encode())
        return cache_dir() / "scores" / f"{digest.hexdigest()[:24]}.json"

    def _score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, desc: str) -> float:
        return evaluate_examples(
            model,
            tokenizer,
            self.task.test[: self.limit],
            self.task.kind,
            batch_size=self.batch_size,
            length_normalized=self.length_normalized,
            max_new_tokens=self.max_new_tokens,
            progress=self.progress,
            desc=desc,
        )
