from pathlib import Path

import pytest

from blindtune.data.records import (
    benchmark_dir,
    carve,
    read_jsonl,
    require_choices,
    require_files,
    require_label,
    shuffled,
)
from blindtune.data.task import DataFormatError


def test_read_jsonl_skips_blank_lines_and_numbers_lines_from_one(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]


@pytest.mark.parametrize(
    ("content", "line", "expected"),
    [("", 1, "empty"), ('{"a": 1}\n[1, 2]\n', 2, "JSON object"), ('{"a": 1}\n{"a": \n', 2, "JSON")],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path: Path, content: str, line: int, expected: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=expected) as error:
        list(read_jsonl(path))
    assert error.value.line == line
    assert f"rows.jsonl:{line}:" in str(error.value)


def test_require_label_accepts_digit_strings_and_rejects_bools_and_out_of_range() -> None:
    path = Path("f.jsonl")
    assert require_label("1", 2, path, 1) == 1
    for bad in (True, 2, -1, "x", None, 1.0):
        with pytest.raises(DataFormatError):
            require_label(bad, 2, path, 1)


def test_require_choices_needs_two_non_empty_strings() -> None:
    path = Path("f.jsonl")
    assert require_choices(["a", "b"], path, 1) == ["a", "b"]
    for bad in (["a"], ["a", ""], "ab", ["a", 3]):
        with pytest.raises(DataFormatError):
            require_choices(bad, path, 1)


def test_shuffled_and_carve_are_deterministic_per_seed() -> None:
    items = list(range(50))
    assert shuffled(items, 3) == shuffled(items, 3) != shuffled(items, 4)
    first, second, rest = carve(items, [5, 10], seed=1)
    assert (len(first), len(second), len(rest)) == (5, 10, 35)
    assert sorted(first + second + rest) == items
    with pytest.raises(ValueError):
        carve(items, [25, 25], seed=1)


def test_benchmark_dir_prefers_argument_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert benchmark_dir("piqa", tmp_path) == tmp_path
    monkeypatch.setenv("BLINDTUNE_DATA_DIR", str(tmp_path))
    assert benchmark_dir("piqa", None) == tmp_path / "piqa"
    monkeypatch.delenv("BLINDTUNE_DATA_DIR")
    assert benchmark_dir("piqa", None).parts[-3:] == ("shared", "data", "piqa")


def test_require_files_names_every_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match=r"missing test\.jsonl"):
        require_files(tmp_path, ["train.jsonl", "test.jsonl"], "demo")
