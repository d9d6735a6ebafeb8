"""Instruction data: both row formats, detection by fields, split files, and errors naming file, line, field."""

import json

import pytest

from blindtune.data import DataFormatError, TaskKind, load_task
from blindtune.data.instruction import load_instruction_data
from blindtune.data.records import benchmark_dir
from blindtune.encoding import ChatPrompt


def _write(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


PAIRS = [{"prompt": f"Add {i} and 1.", "response": f"{i} + 1 = {i + 1}"} for i in range(20)]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Name {i}."},
            {"role": "assistant", "content": f"Number {i}."},
        ]
    }
    for i in range(20)
]


def test_prompt_response_rows_load_as_an_instruction_task(tmp_path):
    task = load_task(str(_write(tmp_path / "pairs.jsonl", PAIRS)), seed=1)
    assert task.kind is TaskKind.INSTRUCTION
    assert (len(task.train), len(task.validation), len(task.test)) == (16, 2, 2)
    example = task.test[0]
    assert isinstance(example.prompt, ChatPrompt) and example.prompt.messages[0][0] == "user"
    assert example.prompt.endswith("Assistant:") and example.target.endswith(str(int(example.target.split()[0]) + 1))


def test_chat_rows_keep_the_conversation_and_the_last_assistant_turn_is_the_response(tmp_path):
    directory = tmp_path / "chat"
    directory.mkdir()
    _write(directory / "train.jsonl", CHATS[:15])
    _write(directory / "test.jsonl", CHATS[15:])
    task = load_task(str(directory))
    assert task.kind is TaskKind.INSTRUCTION and len(task.train) == 15 and len(task.test) == 5
    assert task.test[0].prompt.messages == (("system", "Be brief."), ("user", "Name 15."))
    assert task.test[0].target == "Number 15."


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "Hi", "response": ""}, "'response'"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "'messages'"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}, r"messages\[1\].role"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}]}, "content"),
        ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]}, "last message"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, row, field):
    path = _write(tmp_path / "bad.jsonl", [*PAIRS[:3], row])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl:4: .*{field}"):
        load_instruction_data(path)


def test_a_directory_without_a_test_split_is_refused(tmp_path):
    _write(tmp_path / "train.jsonl", PAIRS)
    with pytest.raises(FileNotFoundError, match="no test split"):
        load_instruction_data(tmp_path)


@pytest.mark.skipif(not (benchmark_dir("gsm8k", None) / "train.jsonl").is_file(), reason="no ../shared/data")
def test_the_shipped_gsm8k_solutions_task():
    task = load_task("gsm8k-solutions")
    assert task.kind is TaskKind.INSTRUCTION and len(task.test) == 1319 and len(task.validation) == 200
    assert "<<" not in task.test[0].target and task.test[0].target.rstrip().split()[-1] == "18"
