"""Evaluate a model on a task's test examples with the scoring its kind calls for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example, TaskData, TaskKind
from blindtune.eval.scoring import evaluate_choices, evaluate_generation


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
    most `max_new_tokens` tokens)."""
    if kind is TaskKind.GENERATION:
        return evaluate_generation(
            model, tokenizer, list(examples), max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        ).accuracy
    return evaluate_choices(
        model,
        tokenizer,
        list(examples),
        batch_size=batch_size,
        length_normalized=length_normalized,
        progress=progress,
        desc=desc,
    ).accuracy


@dataclass
class TaskEvaluator:
    """Scores any model on the same test examples: one instance per run, shared by every row."""

    task: TaskData
    limit: int | None
    batch_size: int = 32
    length_normalized: bool = False
    max_new_tokens: int = 256
    progress: bool = True

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, desc: str) -> float:
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
