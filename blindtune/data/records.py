"""Finding, reading and splitting task files: the helpers every loader shares.

Every loader reports a bad row the same way (`DataFormatError` with file, 1-based line and what was
expected), so users fixing their own files get one kind of message whatever the task.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from blindtune.data.task import DataFormatError

T = TypeVar("T")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line; an empty file is an error.

    Blank lines are skipped because editors and `cat a b >` commonly leave them; anything else that is
    not a JSON object is a format error.
    """
    seen_any = False
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            seen_any = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problem = f"expected one JSON object per line ({error.msg} at column {error.colno})"
                raise DataFormatError(path, line_number, problem) from None
            if not isinstance(record, dict):
                raise DataFormatError(path, line_number, f"expected a JSON object, got {type(record).__name__}")
            yield line_number, record
    if not seen_any:
        raise DataFormatError(path, 1, "file is empty: expected at least one example")


def require_str(record: dict[str, Any], key: str, path: Path, line: int) -> str:
    """The non-empty string `record[key]`, or a DataFormatError naming the field."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(path, line, f"expected a non-empty string field {key!r}, got {value!r}")
    return value


def require_label(value: Any, num_choices: int, path: Path, line: int, key: str = "label") -> int:
    """An integer index into the choices; digit strings are accepted (CSV cells, some JSON exports)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataFormatError(path, line, f"expected an integer field {key!r}, got {value!r}")
    if not 0 <= value < num_choices:
        raise DataFormatError(path, line, f"{key} {value} is out of range for {num_choices} choices")
    return value


def require_choices(values: Any, path: Path, line: int, key: str = "choices") -> list[str]:
    """At least two non-empty strings: a single option cannot be scored against anything."""
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise DataFormatError(path, line, f"expected {key!r} to be a list of non-empty strings, got {values!r}")
    if len(values) < 2:
        raise DataFormatError(path, line, f"expected at least 2 choices in {key!r}, got {len(values)}")
    return values


def shuffled(items: Sequence[T], seed: int) -> list[T]:
    """A copy of `items` in an order that depends only on `seed` (never on global random state)."""
    result = list(items)
    random.Random(seed).shuffle(result)
    return result


def carve(items: Sequence[T], sizes: Sequence[int], seed: int) -> list[list[T]]:
    """Shuffle by seed, then cut consecutive pieces of the given sizes plus one piece with the rest.

    Raises ValueError when the pieces need more items than there are, so a too-small file fails loudly
    instead of yielding an empty test split.
    """
    if sum(sizes) >= len(items):
        raise ValueError(f"cannot carve pieces of {list(sizes)} and a non-empty rest from {len(items)} items")
    order = shuffled(items, seed)
    pieces: list[list[T]] = []
    start = 0
    for size in sizes:
        pieces.append(order[start : start + size])
        start += size
    pieces.append(order[start:])
    return pieces


def benchmark_dir(task: str, data_dir: Path | None) -> Path:
    """A benchmark's directory: data_dir (the task's folder, or the folder holding `<task>/`), else
    $BLINDTUNE_DATA_DIR/<task>, else ../shared/data/<task>."""
    if data_dir is not None:
        return data_dir / task if (data_dir / task).is_dir() else data_dir
    if parent := os.environ.get("BLINDTUNE_DATA_DIR"):
        return Path(parent) / task
    return Path(__file__).resolve().parents[3] / "shared" / "data" / task


def require_files(directory: Path, names: list[str], task: str) -> list[Path]:
    """The paths of the published files, or a FileNotFoundError listing what is expected where."""
    paths = [directory / name for name in names]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{task}: missing {', '.join(missing)} in {directory} (expected the published files "
            f"{', '.join(names)}; pass data_dir (the {task} folder or the one holding {task}/) or set "
            f"BLINDTUNE_DATA_DIR to the folder holding {task}/)"
        )
    return paths
