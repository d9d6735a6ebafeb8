"""GSM8K grade-school math as a generation task, scored by exact match of the final number.

The model is trained on the worked rationale so it learns to reason step by step and to finish with
the canonical `#### <number>` line, which is what `extract_final_number` looks for at evaluation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from blindtune.data.records import benchmark_dir, read_jsonl, require_files, require_str
from blindtune.data.task import DataFormatError, Example, TaskData, TaskKind, register_task

VALIDATION_SIZE = 200
# `<<48/2=24>>` marks what the dataset authors' calculator computed; it is not part of the prose.
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """One spelling per value, so "1,000", "1000.0" and "$1000" compare equal."""
    number = text.strip().replace(",", "").replace("$", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def extract_final_number(text: str) -> str | None:
    """The number after the first "####", else the last number in the text; None if there is none.

    The first "####" is used because a model may keep generating (a new "Question: ...") after its
    answer; without the marker, the last number is the usual final answer of a rationale.
    """
    _, marker, after = text.partition("####")
    if marker:
        match = NUMBER.search(after)
        return normalize_number(match.group()) if match else None
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_example(record: dict[str, Any], path: Path, line: int) -> Example:
    """Prompt with the question; target the cleaned rationale ending in a normalised `#### N` line."""
    question = require_str(record, "question", path, line)
    solution = require_str(record, "answer", path, line)
    rationale, marker, final = solution.rpartition("####")
    if not marker or not NUMBER.fullmatch(final.strip()):
        raise DataFormatError(path, line, f"expected 'answer' to end with a line '#### <number>', got {final!r}")
    answer = normalize_number(final)
    steps = CALCULATOR_ANNOTATION.sub("", rationale).strip()
    target = f" {steps}\n#### {answer}" if steps else f" #### {answer}"
    return Example(prompt=f"Question: {question}\nAnswer:", target=target, answer=answer)


@register_task("gsm8k")
def load_gsm8k(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """GSM8K from `train.jsonl` and `test.jsonl`; validation is the last 200 train rows.

    The split is fixed (not drawn by `seed`) so validation numbers are comparable across runs.
    """
    train_path, test_path = require_files(benchmark_dir("gsm8k", data_dir), ["train.jsonl", "test.jsonl"], "gsm8k")
    train = [gsm8k_example(record, train_path, line) for line, record in read_jsonl(train_path)]
    if len(train) <= VALIDATION_SIZE:
        raise ValueError(f"{train_path}: need more than {VALIDATION_SIZE} rows to hold out a validation split")
    test = [gsm8k_example(record, test_path, line) for line, record in read_jsonl(test_path)]
    return TaskData(
        name="gsm8k",
        kind=TaskKind.GENERATION,
        train=train[:-VALIDATION_SIZE],
        validation=train[-VALIDATION_SIZE:],
        test=test,
    )
