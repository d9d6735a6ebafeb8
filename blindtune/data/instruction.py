"""Instruction data: (prompt, response) pairs or chat conversations, trained on the response tokens only.

A user's JSONL rows are either `{"prompt": ..., "response": ...}` or `{"messages": [{"role", "content"},
...]}` whose last message is the assistant's response (the kind is detected from the first row's fields;
a `.jsonl` file with neither is a multiple-choice file). The prompt becomes a `ChatPrompt`: the tokenizer's
chat template renders it where there is one, else the plain `User: ... / Assistant:` text below. The
response is the example's target, so training puts the loss on response tokens only and evaluation
reports the test responses' mean token negative log-likelihood (`blindtune.eval.instruction`).

One shipped task: `gsm8k-solutions`, GSM8K's question as the instruction and its worked solution (the
calculator annotations removed, ending in `#### <number>`) as the response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blindtune.data.gsm8k import CALCULATOR_ANNOTATION
from blindtune.data.records import benchmark_dir, carve, read_jsonl, require_files, require_str
from blindtune.data.task import DataFormatError, Example, TaskData, TaskKind, register_task
from blindtune.encoding import ChatPrompt

ROLES = ("system", "user", "assistant")
_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
VALIDATION_SIZE = 200


def is_instruction_record(record: dict[str, Any]) -> bool:
    return "messages" in record or ("prompt" in record and "response" in record)


def plain_text(messages: tuple[tuple[str, str], ...]) -> str:
    """The prompt for tokenizers without a chat template: each turn on its own, the assistant's opened."""
    turns = [f"{role.capitalize()}: {content}" for role, content in messages]
    return "\n".join([*turns, "Assistant:"])


def instruction_example(record: dict[str, Any], path: Path, line: int) -> Example:
    """One row as an Example: prompt = the conversation before the response, target = the response."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataFormatError(
                path, line, f"expected 'messages' to be a list of at least 2 messages, got {messages!r}"
            )
        turns = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict):
                raise DataFormatError(path, line, f"expected {where} to be an object with 'role' and 'content'")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise DataFormatError(path, line, f"expected {where}.role in {ROLES}, got {role!r}")
            if not isinstance(content, str) or not content.strip():
                raise DataFormatError(path, line, f"expected {where}.content to be a non-empty string, got {content!r}")
            turns.append((role, content))
        if turns[-1][0] != "assistant":
            raise DataFormatError(path, line, f"expected the last message to be the assistant's, got {turns[-1][0]!r}")
        conversation, response = tuple(turns[:-1]), turns[-1][1]
    else:
        prompt = require_str(record, "prompt", path, line)
        response = require_str(record, "response", path, line)
        conversation = (("user", prompt),)
    return Example(prompt=ChatPrompt(plain_text(conversation), conversation), target=response)


def read_instruction_file(path: Path) -> list[Example]:
    return [instruction_example(record, path, line) for line, record in read_jsonl(path)]


def load_instruction_data(path: Path, seed: int = 0) -> TaskData:
    """A user's instruction task: one JSONL file (split 80/10/10 by `seed`), or a directory of split files
    (`train.jsonl`, `test.jsonl`, optionally `validation.jsonl` / `valid.jsonl` / `dev.jsonl`)."""
    if path.is_dir():
        splits = {}
        for split, stems in _SPLIT_STEMS.items():
            found = [path / f"{stem}.jsonl" for stem in stems if (path / f"{stem}.jsonl").is_file()]
            if not found and split != "validation":
                raise FileNotFoundError(f"{path} has no {split} split: expected {stems[0]}.jsonl")
            splits[split] = read_instruction_file(found[0]) if found else []
        return TaskData(path.name, TaskKind.INSTRUCTION, splits["train"], splits["validation"], splits["test"])
    examples = read_instruction_file(path)
    size = len(examples) // 10
    test, validation, train = carve(examples, [size, size], seed)
    if not train or not test:
        raise DataFormatError(path, 1, f"{len(examples)} rows are too few to split into train and test")
    return TaskData(path.stem, TaskKind.INSTRUCTION, train, validation, test)


def gsm8k_solution_example(record: dict[str, Any], path: Path, line: int) -> Example:
    question = require_str(record, "question", path, line)
    solution = require_str(record, "answer", path, line)
    response = CALCULATOR_ANNOTATION.sub("", solution).strip()
    conversation = (("user", question),)
    return Example(prompt=ChatPrompt(plain_text(conversation), conversation), target=response)


@register_task("gsm8k-solutions")
def load_gsm8k_solutions(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """GSM8K as instruction data: question -> worked solution; validation is the last 200 train rows."""
    train_path, test_path = require_files(benchmark_dir("gsm8k", data_dir), ["train.jsonl", "test.jsonl"], "gsm8k")
    train = [gsm8k_solution_example(record, train_path, line) for line, record in read_jsonl(train_path)]
    test = [gsm8k_solution_example(record, test_path, line) for line, record in read_jsonl(test_path)]
    return TaskData("gsm8k-solutions", TaskKind.INSTRUCTION, train[:-VALIDATION_SIZE], train[-VALIDATION_SIZE:], test)
