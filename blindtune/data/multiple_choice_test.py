import json
from pathlib import Path
from typing import Any

import pytest

from blindtune.data.multiple_choice import (
    hellaswag_clean,
    load_arc_challenge,
    load_arc_easy,
    load_hellaswag,
    load_multiple_choice_file,
    load_openbookqa,
    load_piqa,
    load_pubmedqa,
    load_sciq,
)
from blindtune.data.records import benchmark_dir
from blindtune.data.task import DataFormatError, TaskKind, load_task


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def user_rows(count: int) -> list[dict[str, Any]]:
    return [{"text": f"Is {i} even?", "choices": ["yes", "no "], "label": i % 2} for i in range(count)]


# --- a user's own file --------------------------------------------------------------------------


def test_jsonl_file_is_split_80_10_10_by_seed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", user_rows(50))
    task = load_multiple_choice_file(path, seed=0)
    assert task.name == "mine" and task.kind is TaskKind.MULTIPLE_CHOICE
    assert (len(task.train), len(task.validation), len(task.test)) == (40, 5, 5)
    example = task.train[0]
    assert example.prompt.startswith("Is ") and example.prompt.endswith(" even?\nAnswer:")
    assert example.choices == (" yes", " no")
    assert example.target == example.choices[example.label]
    assert load_multiple_choice_file(path, seed=0) == task
    assert load_multiple_choice_file(path, seed=1).test != task.test
    assert load_task(str(path)) == task


def test_field_names_can_be_remapped(tmp_path: Path) -> None:
    rows = [{"q": "Sky?", "opts": ["blue", "red"], "gold": 0}] * 10
    task = load_multiple_choice_file(
        write_jsonl(tmp_path / "x.jsonl", rows),
        text_field="q",
        choices_field="opts",
        label_field="gold",
        name="sky",
    )
    assert task.name == "sky" and task.test[0].target == " blue"


def test_csv_with_numbered_choice_columns_and_a_json_choices_column(tmp_path: Path) -> None:
    numbered = tmp_path / "numbered.csv"
    numbered.write_text('text,choice0,choice1,choice2,label\n"A, or B?",a,b,,1\nC?,c,d,e,2\nE?,e,f,,0\n')
    task = load_multiple_choice_file(numbered)
    examples = task.train + task.validation + task.test
    assert sorted(e.prompt for e in examples) == ["A, or B?\nAnswer:", "C?\nAnswer:", "E?\nAnswer:"]
    assert {e.choices for e in examples} == {(" a", " b"), (" c", " d", " e"), (" e", " f")}
    assert task.label_names == ("A", "B", "C")
    listed = tmp_path / "listed.csv"
    listed.write_text('text,choices,label\nA?,"[""x"", ""y""]",1\nB?,"[""x"", ""y""]",0\nC?,"[""x"", ""y""]",0\n')
    assert len(load_multiple_choice_file(listed).test) == 1


def test_directory_uses_split_files_and_carves_validation_when_absent(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", user_rows(20))
    write_jsonl(tmp_path / "test.jsonl", user_rows(3))
    task = load_multiple_choice_file(tmp_path)
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 2, 3)
    write_jsonl(tmp_path / "dev.jsonl", user_rows(4))
    task = load_multiple_choice_file(tmp_path)
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 4, 3)
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl or test\.csv"):
        load_multiple_choice_file(tmp_path)


GOOD = json.dumps(user_rows(1)[0])


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        ("{not json", "JSON"),
        ('{"choices": ["a", "b"], "label": 0}', "'text'"),
        ('{"text": "t", "choices": ["a", "b"], "label": 2}', "out of range"),
        ('{"text": "t", "choices": ["a", "b"], "label": "first"}', "integer"),
        ('{"text": "t", "choices": ["a"], "label": 0}', "at least 2 choices"),
        ('{"text": "t", "label": 0}', "'choices'"),
    ],
)
def test_malformed_jsonl_rows_name_the_line(tmp_path: Path, bad_row: str, problem: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad_row])
    with pytest.raises(DataFormatError, match=problem) as error:
        load_multiple_choice_file(path)
    assert "bad.jsonl:3:" in str(error.value)


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        ("", 1, "empty"),
        ("text,choice0,choice1,label\n", 2, "no rows"),
        ("question,choice0,choice1,label\nq,a,b,0\n", 1, "header"),
        ("text,choice0,choice1,label\nq,a,b,0\nq,a,b,5\n", 3, "out of range"),
        ("text,choice0,choice1,label\nq,a,,0\n", 2, "at least 2 choices"),
        ("text,choices,label\nq,[oops,0\n", 2, "JSON list"),
    ],
)
def test_malformed_csv_names_the_line(tmp_path: Path, content: str, line: int, problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=problem) as error:
        load_multiple_choice_file(path)
    assert f"bad.csv:{line}:" in str(error.value)


def test_empty_jsonl_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"empty.jsonl:1: file is empty"):
        load_multiple_choice_file(write_jsonl(tmp_path / "empty.jsonl", []))


# --- benchmarks ----------------------------------------------------------------------------------


def test_piqa_prompt_and_carved_splits(tmp_path: Path) -> None:
    rows = [{"goal": f"Open jar {i}", "sol1": "twist lid ", "sol2": "hit lid", "label": i % 2} for i in range(1300)]
    write_jsonl(tmp_path / "valid.jsonl", rows)
    task = load_piqa(tmp_path, seed=0)
    assert (len(task.train), len(task.validation), len(task.test)) == (1000, 200, 100)
    assert task.test[0].prompt.startswith("Question: Open jar ") and task.test[0].prompt.endswith("\nAnswer:")
    assert task.test[0].choices == (" twist lid", " hit lid")
    write_jsonl(tmp_path / "valid.jsonl", [rows[0], {"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(DataFormatError, match=r"valid\.jsonl:2: .*'sol2'"):
        load_piqa(tmp_path, seed=0)


def pubmed_row(i: int, decision: str = "maybe") -> dict[str, Any]:
    return {"QUESTION": f"Q{i}?", "CONTEXTS": ["First.", "Second."], "final_decision": decision}


def test_pubmedqa_prompt_and_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "pqal_trainval.jsonl", [pubmed_row(i) for i in range(500)])
    write_jsonl(tmp_path / "pqal_test.jsonl", [pubmed_row(7, "no")])
    task = load_pubmedqa(tmp_path, seed=0)
    assert (len(task.train), len(task.validation), len(task.test)) == (450, 50, 1)
    example = task.test[0]
    assert example.prompt == "Abstract: First. Second.\nQuestion: Q7?\nAnswer:"
    assert example.choices == (" yes", " no", " maybe") and example.label == 1 and example.target == " no"
    write_jsonl(tmp_path / "pqal_test.jsonl", [pubmed_row(1), pubmed_row(2, "perhaps")])
    with pytest.raises(DataFormatError, match=r"pqal_test\.jsonl:2: .*final_decision"):
        load_pubmedqa(tmp_path, seed=0)


def arc_row(stem: str, answer: str, labels: str = "ABCD") -> dict[str, Any]:
    choices = [{"text": f"option {label}", "label": label} for label in labels]
    return {"id": "x", "question": {"stem": stem, "choices": choices}, "answerKey": answer}


@pytest.mark.parametrize(("loader", "prefix"), [(load_arc_easy, "ARC-Easy"), (load_arc_challenge, "ARC-Challenge")])
def test_arc_reads_the_release_files(tmp_path: Path, loader: Any, prefix: str) -> None:
    write_jsonl(tmp_path / f"{prefix}-Train.jsonl", [arc_row("Why?", "C"), arc_row("How?", "2", labels="1234")])
    write_jsonl(tmp_path / f"{prefix}-Dev.jsonl", [arc_row("Who?", "A", labels="ABC")])
    write_jsonl(tmp_path / f"{prefix}-Test.jsonl", [arc_row("What?", "E", labels="ABCDE")])
    task = loader(tmp_path, 0)
    assert [e.label for e in task.train] == [2, 1]
    assert task.train[0].prompt == "Question: Why?\nAnswer:" and task.train[0].target == " option C"
    assert task.label_names == ("A", "B", "C", "D", "E")
    write_jsonl(tmp_path / f"{prefix}-Dev.jsonl", [arc_row("Who?", "A"), arc_row("Who?", "F")])
    with pytest.raises(DataFormatError, match=r"Dev\.jsonl:2: .*answerKey"):
        loader(tmp_path, 0)


def test_openbookqa_scores_options_as_a_continuation_of_the_stem(tmp_path: Path) -> None:
    for split in ("train", "dev", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", [arc_row("The sun is responsible for", "B")])
    task = load_openbookqa(tmp_path, seed=0)
    assert task.test[0].prompt == "The sun is responsible for" and task.test[0].target == " option B"
    write_jsonl(tmp_path / "test.jsonl", [arc_row("ok", "A"), {"question": "flat", "answerKey": "A"}])
    with pytest.raises(DataFormatError, match=r"test\.jsonl:2:"):
        load_openbookqa(tmp_path, seed=0)


def sciq_row(i: int) -> dict[str, str]:
    answer = {"question": f"Q{i}?", "correct_answer": "right", "support": "Because.\n"}
    return answer | {f"distractor{k}": f"wrong{k}" for k in (1, 2, 3)}


def test_sciq_reads_json_arrays_and_shuffles_the_gold_position(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.json").write_text(json.dumps([sciq_row(i) for i in range(40)]))
    task = load_sciq(tmp_path, seed=0)
    assert len(task.test) == 40 and task.label_names == ("A", "B", "C", "D")
    example = task.test[0]
    assert example.prompt == "Because.\nQuestion: Q0?\nAnswer:" and example.target == " right"
    assert len({e.label for e in task.train}) > 1
    assert load_sciq(tmp_path, seed=0) == task
    (tmp_path / "valid.json").write_text(json.dumps([sciq_row(0), {"question": "q"}]))
    with pytest.raises(DataFormatError, match=r"valid\.json:2: .*'correct_answer'"):
        load_sciq(tmp_path, seed=0)


def test_sciq_also_reads_jsonl(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", [sciq_row(0)])
    assert load_sciq(tmp_path, seed=0).test[0].target == " right"


def hellaswag_row(label: Any = 1) -> dict[str, Any]:
    return {
        "activity_label": "Making a cake",
        "ctx_a": "A man mixes flour.",
        "ctx_b": "then he",
        "endings": ["bakes it [title] now.", "sings.", "sleeps  well.", "leaves."],
        "label": label,
    }


def test_hellaswag_applies_lm_eval_preprocessing(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "hellaswag_train.jsonl", [hellaswag_row()] * 30)
    write_jsonl(tmp_path / "hellaswag_val.jsonl", [hellaswag_row("2")])
    task = load_hellaswag(tmp_path, seed=0)
    assert (len(task.train), len(task.validation), len(task.test)) == (27, 3, 1)
    example = task.test[0]
    assert example.prompt == "Making a cake: A man mixes flour. Then he"
    assert example.choices == (" bakes it. now.", " sings.", " sleeps well.", " leaves.") and example.label == 2
    assert hellaswag_clean(" A [header] B  C ") == "A B C"
    write_jsonl(tmp_path / "hellaswag_val.jsonl", [hellaswag_row(), hellaswag_row(4)])
    with pytest.raises(DataFormatError, match=r"hellaswag_val\.jsonl:2: .*out of range"):
        load_hellaswag(tmp_path, seed=0)


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("arc-easy", "ARC-Easy-Train.jsonl, ARC-Easy-Dev.jsonl, ARC-Easy-Test.jsonl"),
        ("arc-challenge", "ARC-Challenge-Train.jsonl"),
        ("openbookqa", "train.jsonl, dev.jsonl, test.jsonl"),
        ("sciq", "train.json, valid.json, test.json"),
        ("hellaswag", "hellaswag_train.jsonl, hellaswag_val.jsonl"),
        ("piqa", "valid.jsonl"),
        ("pubmedqa", "pqal_trainval.jsonl, pqal_test.jsonl"),
    ],
)
def test_absent_benchmarks_name_the_expected_files(tmp_path: Path, task: str, expected: str) -> None:
    with pytest.raises(FileNotFoundError, match=expected):
        load_task(task, data_dir=tmp_path)


@pytest.mark.skipif(
    not (benchmark_dir("piqa", None).is_dir() and benchmark_dir("pubmedqa", None).is_dir()),
    reason="../shared/data is not beside this checkout",
)
def test_real_piqa_and_pubmedqa_load() -> None:
    piqa = load_task("piqa")
    assert (len(piqa.train), len(piqa.validation), len(piqa.test)) == (1000, 200, 638)
    pubmedqa = load_task("pubmedqa")
    assert (len(pubmedqa.train), len(pubmedqa.validation), len(pubmedqa.test)) == (450, 50, 500)
    assert [sum(e.label == i for e in pubmedqa.test) for i in range(3)] == [276, 169, 55]


# --- your own task, as you have it --------------------------------------------------------------


def test_a_folder_of_split_files_is_a_task_by_path(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", user_rows(20))
    write_jsonl(tmp_path / "test.jsonl", user_rows(6))
    write_jsonl(tmp_path / "validation.jsonl", user_rows(4))
    task = load_task(str(tmp_path))
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 4, 6)


def test_template_and_choice_prefix_shape_a_users_rows(tmp_path: Path) -> None:
    rows = [{"text": "cause to collide", "choices": ["motion", "contact"], "label": 1}] * 12
    path = write_jsonl(tmp_path / "senses.jsonl", rows)
    default = load_task(str(path)).test[0]
    assert (default.prompt, default.choices) == ("cause to collide\nAnswer:", (" motion", " contact"))
    shaped = load_task(str(path), template="Definition: {text}\nCategory:", choice_prefix=" the ").test[0]
    assert shaped.prompt == "Definition: cause to collide\nCategory:"
    assert shaped.choices == (" the motion", " the contact") and shaped.target == " the contact"


@pytest.mark.parametrize("template", ["no field", "{text} and {label}", "{text"])
def test_a_template_needs_exactly_the_text_field(tmp_path: Path, template: str) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", user_rows(12))
    with pytest.raises(ValueError, match="template"):
        load_task(str(path), template=template)


def test_a_registered_task_refuses_a_template() -> None:
    with pytest.raises(KeyError, match="its own prompts"):
        load_task("piqa", template="{text}")


def test_piqa_data_dir_may_be_the_folder_or_the_one_holding_it(tmp_path: Path) -> None:
    rows = [{"goal": f"Open jar {i}", "sol1": "twist", "sol2": "hit", "label": i % 2} for i in range(1300)]
    write_jsonl((tmp_path / "piqa").mkdir() or tmp_path / "piqa" / "valid.jsonl", rows)
    assert benchmark_dir("piqa", tmp_path) == tmp_path / "piqa"
    assert len(load_piqa(tmp_path).test) == len(load_piqa(tmp_path / "piqa").test) == 100


def test_a_jsonl_syntax_error_reports_one_line_number(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"text": "t",, "choices": []}'])
    with pytest.raises(DataFormatError) as error:
        load_multiple_choice_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and "line 1" not in message and "column 14" in message
