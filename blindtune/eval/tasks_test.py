"""The evaluator's score cache: a hit only for the same weights, tokenizer, examples and settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blindtune.data import Example, TaskData, TaskKind
from blindtune.eval.tasks import TaskEvaluator
from blindtune.models import tiny_model

EXAMPLES = [Example(f"Q{i}:", " a", (" a", " b"), 0) for i in range(4)]
TASK = TaskData("toy", TaskKind.MULTIPLE_CHOICE, EXAMPLES, [], EXAMPLES)


def test_reuse_scores_once_per_model_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = tiny_model(num_layers=2, hidden_size=16)  # before moving the cache: its tokenizer is cached there
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path))
    evaluator = TaskEvaluator(TASK, limit=None, batch_size=2, progress=False)
    scored: list[str] = []
    original = TaskEvaluator._score

    def counting(self: TaskEvaluator, *args: object) -> float:
        scored.append(self.task.name)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(TaskEvaluator, "_score", counting)
    first = evaluator(loaded.model, loaded.tokenizer, "llm", reuse=True)
    assert evaluator(loaded.model, loaded.tokenizer, "llm", reuse=True) == first and len(scored) == 1
    assert len(list((tmp_path / "scores").glob("*.json"))) == 1

    TaskEvaluator(TASK, limit=2, batch_size=2, progress=False)(loaded.model, loaded.tokenizer, "llm", reuse=True)
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)
    evaluator(loaded.model, loaded.tokenizer, "llm", reuse=True)
    evaluator(loaded.model, loaded.tokenizer, "llm")  # without reuse: scored, not stored
    assert len(scored) == 4 and len(list((tmp_path / "scores").glob("*.json"))) == 3


def test_rounds_before_the_last_score_the_first_round_limit_examples() -> None:
    evaluator = TaskEvaluator(TASK, limit=3, progress=False, round_limit=2)
    assert [evaluator.in_round(r, 4).limit for r in (1, 3, 4)] == [2, 2, 3]  # the run's result: all of them
    assert TaskEvaluator(TASK, limit=None, round_limit=5).in_round(1, 2).limit == 5
    assert TaskEvaluator(TASK, limit=1, round_limit=5).in_round(1, 2).limit == 1
    assert TaskEvaluator(TASK, limit=3).in_round(1, 4) == TaskEvaluator(TASK, limit=3)


def test_right_or_wrong_per_example_is_what_the_accuracy_counts() -> None:
    loaded = tiny_model(num_layers=2, hidden_size=16)
    examples = [Example(f"Q{i}:", "", (" a", " b", " c"), i % 3) for i in range(9)]
    task = TaskData("toy3", TaskKind.MULTIPLE_CHOICE, examples, [], examples)
    evaluator = TaskEvaluator(task, limit=7, batch_size=4, progress=False)
    correct = evaluator.correct(loaded.model, loaded.tokenizer, "toy")
    assert len(correct) == 7
    assert sum(correct) / 7 == evaluator(loaded.model, loaded.tokenizer, "toy")
    instructions = TaskData("notes", TaskKind.INSTRUCTION, examples, [], examples)
    with pytest.raises(ValueError, match="NLL"):
        TaskEvaluator(instructions, limit=None, progress=False).correct(loaded.model, loaded.tokenizer, "notes")
