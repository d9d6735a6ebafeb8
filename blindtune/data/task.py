"""The one interface every task implements, and the registry that finds tasks by name.

A task turns some source (WordNet files, a benchmark's JSONL, a user's file) into `Example`s split
into train / validation / test. Everything downstream (training, evaluation, partitioning) sees only
`Example`s, so a new task is one loader function registered under a name.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class TaskKind(enum.StrEnum):
    MULTIPLE_CHOICE = "multiple_choice"  # scored by log-likelihood of each option
    GENERATION = "generation"  # scored by exact match of the generated final answer
    INSTRUCTION = "instruction"  # scored by the responses' mean token negative log-likelihood


@dataclass(frozen=True)
class Example:
    """One task instance.

    prompt:  text the model conditions on; ends right before the answer (no trailing space).
    target:  the gold continuation used for training (starts with its separator, e.g. " animal").
    choices: continuations scored for multiple-choice evaluation (each with its separator); empty for
             generation tasks.
    label:   index of the gold option in `choices`; -1 for generation tasks.
    answer:  the final answer compared by exact match (generation tasks); None otherwise.
    """

    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    label: int = -1
    answer: str | None = None


@dataclass(frozen=True)
class TaskData:
    """A loaded task: its splits and what it needs for evaluation."""

    name: str
    kind: TaskKind
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    label_names: tuple[str, ...] = field(default=())  # one per label index, for reports/partitioning


class DataFormatError(ValueError):
    """A row of a data file is not what the task expects (the message names file, line and field)."""

    def __init__(self, path: str | Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


class UnknownTaskError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its argument; we want a readable sentence
        return str(self.args[0])


# A loader takes the data directory (None: its default location) and a seed for deterministic splits.
TaskLoader = Callable[[Path | None, int], TaskData]

_TASKS: dict[str, TaskLoader] = {}


def register_task(name: str) -> Callable[[TaskLoader], TaskLoader]:
    """Register a loader under `name` (decorator)."""

    def decorator(loader: TaskLoader) -> TaskLoader:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        _TASKS[name] = loader
        return loader

    return decorator


def task_names() -> list[str]:
    _import_builtin_tasks()
    return sorted(_TASKS)


def load_task(
    name_or_path: str,
    data_dir: str | Path | None = None,
    seed: int = 0,
    template: str | None = None,
    choice_prefix: str | None = None,
) -> TaskData:
    """Load a task by registered name, or a user's multiple-choice data by path: a JSONL/CSV file, or a
    folder with `train` and `test` files (and optionally `validation`).

    `data_dir` overrides where a registered task reads its files (e.g. `../shared/data/piqa`, or
    `../shared/data`). `template` and `choice_prefix` say how a user's rows are put to the model (see
    `load_multiple_choice_file`; None: the defaults); a registered task has its own prompts.
    Loaded tasks are cached per process: every client and evaluator of a run parses the files once.
    """
    return _load_task_cached(name_or_path, None if data_dir is None else str(data_dir), seed, template, choice_prefix)


def is_user_task(name_or_path: str) -> bool:
    """Whether `name_or_path` names a user's data (a .jsonl/.csv file or a folder), not a registered task."""
    path = Path(name_or_path)
    return name_or_path not in task_names() and (path.suffix.lower() in {".jsonl", ".csv"} or path.is_dir())


@functools.lru_cache(maxsize=8)
def _load_task_cached(
    name_or_path: str, data_dir: str | None, seed: int, template: str | None, choice_prefix: str | None
) -> TaskData:
    _import_builtin_tasks()
    directory = Path(data_dir) if data_dir is not None else None
    if name_or_path in _TASKS:
        if template is not None or choice_prefix is not None:
            raise UnknownTaskError(
                f"task {name_or_path!r} has its own prompts: a template or choice prefix applies to your own files"
            )
        return _TASKS[name_or_path](directory, seed)
    path = Path(name_or_path)
    if _is_instruction_data(path):
        from blindtune.data.instruction import load_instruction_data

        return load_instruction_data(path, seed=seed)
    if is_user_task(name_or_path):
        from blindtune.data import multiple_choice

        return multiple_choice.load_multiple_choice_file(
            name_or_path,
            seed=seed,
            template=multiple_choice.DEFAULT_TEMPLATE if template is None else template,
            choice_prefix=multiple_choice.DEFAULT_CHOICE_PREFIX if choice_prefix is None else choice_prefix,
        )
    raise UnknownTaskError(
        f"unknown task {name_or_path!r}: use one of {', '.join(task_names())}, a path to a .jsonl/.csv file, "
        "or a folder holding train.jsonl and test.jsonl (optionally validation.jsonl)"
    )


def _is_instruction_data(path: Path) -> bool:
    """A JSONL file (or a directory's train.jsonl) whose first row has instruction fields."""
    from blindtune.data.instruction import is_instruction_record
    from blindtune.data.records import read_jsonl

    first_file = path / "train.jsonl" if path.is_dir() else path
    if first_file.suffix.lower() != ".jsonl" or not first_file.is_file():
        return False
    for _, record in read_jsonl(first_file):
        return is_instruction_record(record)
    return False


def _import_builtin_tasks() -> None:
    # Importing the modules runs their @register_task decorators.
    from blindtune.data import gsm8k, instruction, multiple_choice, wordnet  # noqa: F401
