import json
from pathlib import Path

import pytest

from blindtune.data.gsm8k import extract_final_number, load_gsm8k, normalize_number
from blindtune.data.records import benchmark_dir
from blindtune.data.task import DataFormatError, TaskKind

ROW = {
    "question": "Ann has 2 apples and buys 1,000 more. How many?",
    "answer": "2+1000=<<2+1000=1002>>1002\n#### 1,002",
}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so she has 5 left.\n#### 18", "18"),
        ("#### $1,200.0\nQuestion: what is 7?", "1200"),
        ("The answer is 3.50 dollars, not 4", "4"),
        ("it costs 0.50", "0.5"),
        ("#### -7", "-7"),
        ("no digits here", None),
        ("#### none", None),
    ],
)
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


def test_normalize_number_gives_one_spelling_per_value() -> None:
    assert normalize_number("1,000") == normalize_number("1000.0") == normalize_number("$1000") == "1000"


def test_load_gsm8k_cleans_rationale_and_holds_out_last_200(tmp_path: Path) -> None:
    rows = [{**ROW, "question": f"q{i}"} for i in range(205)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [ROW])
    task = load_gsm8k(tmp_path, seed=0)
    assert task.kind is TaskKind.GENERATION
    assert (len(task.train), len(task.validation), len(task.test)) == (5, 200, 1)
    assert task.validation[0].prompt == "Question: q5\nAnswer:"
    example = task.test[0]
    assert example.target == " 2+1000=1002\n#### 1002"
    assert example.answer == "1002" == extract_final_number(example.target)
    assert example.label == -1 and example.choices == ()


@pytest.mark.parametrize(
    "bad",
    [
        {"question": "q"},
        {"question": "q", "answer": "no marker"},
        {"question": "q", "answer": "x\n#### seven"},
    ],
)
def test_malformed_rows_name_the_line(tmp_path: Path, bad: dict[str, str]) -> None:
    write_jsonl(tmp_path / "train.jsonl", [ROW, bad])
    write_jsonl(tmp_path / "test.jsonl", [ROW])
    with pytest.raises(DataFormatError, match=r"train\.jsonl:2:"):
        load_gsm8k(tmp_path, seed=0)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl, test\.jsonl"):
        load_gsm8k(tmp_path, seed=0)


@pytest.mark.skipif(not (benchmark_dir("gsm8k", None) / "train.jsonl").is_file(), reason="no ../shared/data")
def test_real_gsm8k_loads() -> None:
    task = load_gsm8k(None, seed=0)
    assert (len(task.train), len(task.validation), len(task.test)) == (7273, 200, 1319)
    assert all("<<" not in example.target for example in task.train)
    assert all(extract_final_number(example.target) == example.answer for example in task.test)
