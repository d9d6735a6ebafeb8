"""Evaluate a model on a task's examples with the scoring its kind calls for."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example, TaskKind
from blindtune.eval.scoring import evaluate_choices, evaluate_generation


def evaluate_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    kind: TaskKind,
    *,
    batch_size: int = 32,
    length_normalized: bool = False,
    progress: bool = True,
    desc: str = "eval",
) -> float:
    """Accuracy in [0, 1]: option log-likelihood for multiple choice, exact match for generation."""
    if kind is TaskKind.GENERATION:
        return evaluate_generation(
            model, tokenizer, list(examples), batch_size=batch_size, progress=progress
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
