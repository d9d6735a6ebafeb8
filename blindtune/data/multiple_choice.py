"""Multiple-choice tasks: a user's own JSONL/CSV file, and standard benchmarks in their published formats.

Every loader here produces the same `Example` shape (prompt ending right before the answer, options
with a leading space) so evaluation scores all of them by per-option log-likelihood, the protocol of
lm-evaluation-harness; prompts follow that harness so results stay comparable with published numbers.

Benchmark loaders read local files only (no network at run time). Their directory is `data_dir`, else
`$BLINDTUNE_DATA_DIR/<task>`, else `<checkout>/../shared/data/<task>`.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from blindtune.data.records import (
    benchmark_dir,
    carve,
    read_jsonl,
    require_choices,
    require_files,
    require_label,
    require_str,
)
from blindtune.data.task import DataFormatError, Example, TaskData, TaskKind, register_task

VALIDATION_STEMS = ("validation", "valid", "dev")
# Turns one parsed row (record, file, 1-based line) into an Example, raising DataFormatError when malformed.
RowConverter = Callable[[dict[str, Any], Path, int], Example]
FILE_SUFFIXES = (".jsonl", ".csv")


# How a user's row `{"text": ..., "choices": [...]}` is put to the model unless the config says otherwise:
# prompt `DEFAULT_TEMPLATE.format(text=text)`, each option scored as `DEFAULT_CHOICE_PREFIX + option`.
DEFAULT_TEMPLATE = "{text}\nAnswer:"
DEFAULT_CHOICE_PREFIX = " "


def make_example(prompt: str, options: list[str], label: int, prefix: str = DEFAULT_CHOICE_PREFIX) -> Example:
    """Options get `prefix` (one leading space by default); stray whitespace around them (PIQA has some)
    is dropped."""
    choices = tuple(prefix + option.strip() for option in options)
    return Example(prompt=prompt, target=choices[label], choices=choices, label=label)


def check_template(template: str) -> None:
    """A prompt template must use `{text}` and no other field (ValueError saying so otherwise)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"prompt template {template!r}: {error} (write a literal brace as {{{{ or }}}})") from None
    if fields != {"text"}:
        raise ValueError(f"prompt template {template!r} must contain {{text}} and no other field, found {fields}")


def letter_names(examples: list[Example]) -> tuple[str, ...]:
    """Letters A, B, ... up to the largest option count, as label names for reports and partitioning."""
    count = max((len(example.choices) for example in examples), default=0)
    return tuple(chr(ord("A") + i) for i in range(count))


# ---------------------------------------------------------------------------------------------------
# A user's own file


def load_multiple_choice_file(
    path: str | Path,
    seed: int = 0,
    text_field: str = "text",
    choices_field: str = "choices",
    label_field: str = "label",
    name: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    choice_prefix: str = DEFAULT_CHOICE_PREFIX,
) -> TaskData:
    """A task from a user's multiple-choice data: one .jsonl/.csv file, or a directory of split files.

    Rows: JSONL `{"text": ..., "choices": [...], "label": <0-based index>}` (field names remappable), or
    CSV with a `text` column, a `label` column and either a `choices` column holding a JSON list or
    numbered columns `choice0`, `choice1`, ... (the choices field name without its trailing "s"; empty
    cells are skipped, so rows may have different option counts).

    A single file is split 80/10/10 into train/validation/test by `seed`. A directory must hold
    `train` and `test` files (.jsonl or .csv) and may hold `validation`/`valid`/`dev`; without one,
    validation is 10% of train, carved by `seed`.

    Each row becomes the prompt `template.format(text=row text)` (default `"{text}\nAnswer:"`) with
    options `choice_prefix + option` (default one space), e.g. `"Definition: {text}\nCategory:"`.
    """
    path = Path(path)
    check_template(template)
    row_format = (text_field, choices_field, label_field, template, choice_prefix)
    if path.is_dir():
        train = _read_user_rows(_required_split_file(path, "train"), *row_format)
        test = _read_user_rows(_required_split_file(path, "test"), *row_format)
        validation_path = _split_file(path, VALIDATION_STEMS)
        if validation_path is not None:
            validation = _read_user_rows(validation_path, *row_format)
        else:
            validation, train = carve(train, [max(1, len(train) // 10)], seed)
    else:
        examples = _read_user_rows(path, *row_format)
        held_out = max(1, len(examples) // 10)
        test, validation, train = carve(examples, [held_out, held_out], seed)
    return TaskData(
        name=name or path.stem,
        kind=TaskKind.MULTIPLE_CHOICE,
        train=train,
        validation=validation,
        test=test,
        label_names=letter_names(train + validation + test),
    )


def _split_file(directory: Path, stems: tuple[str, ...]) -> Path | None:
    """The first `<stem>.jsonl` or `<stem>.csv` present, in the order given."""
    for stem in stems:
        for suffix in FILE_SUFFIXES:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _required_split_file(directory: Path, stem: str) -> Path:
    path = _split_file(directory, (stem,))
    if path is None:
        names = " or ".join(f"{stem}{suffix}" for suffix in FILE_SUFFIXES)
        raise FileNotFoundError(f"{directory} has no {stem} split: expected {names}")
    return path


def _read_user_rows(
    path: Path, text_field: str, choices_field: str, label_field: str, template: str, choice_prefix: str
) -> list[Example]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records: Iterator[tuple[int, dict[str, Any]]] = read_jsonl(path)
    elif suffix == ".csv":
        records = _read_csv(path, text_field, choices_field, label_field)
    else:
        raise ValueError(f"{path}: expected a .jsonl or .csv file")
    examples = []
    for line, record in records:
        text = require_str(record, text_field, path, line)
        options = require_choices(record.get(choices_field), path, line, choices_field)
        label = require_label(record.get(label_field), len(options), path, line, label_field)
        examples.append(make_example(template.format(text=text), options, label, choice_prefix))
    return examples


def _read_csv(
    path: Path, text_field: str, choices_field: str, label_field: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line, {text, choices, label}) per CSV row, so CSV rows pass the same checks as JSONL."""
    # utf-8-sig: spreadsheet programs often start a CSV export with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise DataFormatError(path, 1, "file is empty: expected a header row and at least one example")
        prefix = choices_field.removesuffix("s")
        numbered = sorted(
            (c for c in header if c.startswith(prefix) and c[len(prefix) :].isdigit()),
            key=lambda c: int(c[len(prefix) :]),
        )
        missing = [c for c in (text_field, label_field) if c not in header]
        if missing or (choices_field not in header and not numbered):
            raise DataFormatError(
                path,
                1,
                f"expected header columns {text_field!r}, {label_field!r} and either {choices_field!r} "
                f"(a JSON list) or {prefix}0, {prefix}1, ...; got {header}",
            )
        seen_any = False
        for row in reader:
            seen_any = True
            line = reader.line_num
            if choices_field in header:
                try:
                    choices = json.loads(row[choices_field] or "null")
                except json.JSONDecodeError:
                    raise DataFormatError(
                        path, line, f"expected column {choices_field!r} to hold a JSON list of strings"
                    ) from None
            else:
                choices = [row[c] for c in numbered if row[c]]
            yield line, {text_field: row[text_field], choices_field: choices, label_field: row[label_field]}
        if not seen_any:
            raise DataFormatError(path, 2, "no rows after the header: expected at least one example")


# ---------------------------------------------------------------------------------------------------
# Standard benchmarks


def _read_jsonl_examples(path: Path, convert: RowConverter) -> list[Example]:
    return [convert(record, path, line) for line, record in read_jsonl(path)]


def piqa_example(record: dict[str, Any], path: Path, line: int) -> Example:
    goal = require_str(record, "goal", path, line)
    options = [require_str(record, "sol1", path, line), require_str(record, "sol2", path, line)]
    label = require_label(record.get("label"), 2, path, line)
    return make_example(f"Question: {goal}\nAnswer:", options, label)


@register_task("piqa")
def load_piqa(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """PIQA from `valid.jsonl` with labels (the train text is not available offline).

    The 1,838 labelled rows are carved by `seed` into 1,000 train / 200 validation / 638 test, so
    test accuracy is not comparable with the official validation numbers (a different subset).
    """
    (valid,) = require_files(benchmark_dir("piqa", data_dir), ["valid.jsonl"], "piqa")
    examples = _read_jsonl_examples(valid, piqa_example)
    train, validation, test = carve(examples, [1000, 200], seed)
    return TaskData("piqa", TaskKind.MULTIPLE_CHOICE, train, validation, test, label_names=("sol1", "sol2"))


PUBMEDQA_ANSWERS = ("yes", "no", "maybe")


def pubmedqa_example(record: dict[str, Any], path: Path, line: int) -> Example:
    question = require_str(record, "QUESTION", path, line)
    contexts = record.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise DataFormatError(path, line, f"expected 'CONTEXTS' to be a non-empty list of strings, got {contexts!r}")
    decision = record.get("final_decision")
    if decision not in PUBMEDQA_ANSWERS:
        raise DataFormatError(path, line, f"expected 'final_decision' in {PUBMEDQA_ANSWERS}, got {decision!r}")
    prompt = f"Abstract: {' '.join(contexts)}\nQuestion: {question}\nAnswer:"
    return make_example(prompt, list(PUBMEDQA_ANSWERS), PUBMEDQA_ANSWERS.index(decision))


@register_task("pubmedqa")
def load_pubmedqa(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """PubMedQA PQA-L: 450 train / 50 validation carved by `seed` from the 500 non-test items, and the
    official 500 test items (the paper's protocol uses 450/50 folds of the same 500)."""
    trainval, test = require_files(
        benchmark_dir("pubmedqa", data_dir), ["pqal_trainval.jsonl", "pqal_test.jsonl"], "pubmedqa"
    )
    validation, train = carve(_read_jsonl_examples(trainval, pubmedqa_example), [50], seed)
    return TaskData(
        "pubmedqa",
        TaskKind.MULTIPLE_CHOICE,
        train,
        validation,
        _read_jsonl_examples(test, pubmedqa_example),
        label_names=PUBMEDQA_ANSWERS,
    )


def _arc_parts(record: dict[str, Any], path: Path, line: int) -> tuple[str, list[str], int]:
    """(stem, option texts, gold index) from the ARC/OpenBookQA shape; answerKey names a choice label."""
    question = record.get("question")
    if not isinstance(question, dict):
        raise DataFormatError(path, line, "expected 'question' to be an object with 'stem' and 'choices'")
    stem = require_str(question, "stem", path, line)
    choices = question.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise DataFormatError(path, line, "expected 'question.choices' to be a list of {'text', 'label'} objects")
    texts = require_choices([c.get("text") for c in choices], path, line, "question.choices[].text")
    keys = [str(c.get("label")) for c in choices]
    answer = str(record.get("answerKey"))
    if answer not in keys:
        raise DataFormatError(path, line, f"expected 'answerKey' to be one of the choice labels {keys}, got {answer!r}")
    return stem, texts, keys.index(answer)


def arc_example(record: dict[str, Any], path: Path, line: int) -> Example:
    stem, texts, label = _arc_parts(record, path, line)
    return make_example(f"Question: {stem}\nAnswer:", texts, label)


def openbookqa_example(record: dict[str, Any], path: Path, line: int) -> Example:
    """lm-eval scores OpenBookQA options as a continuation of the bare stem (often an unfinished sentence)."""
    stem, texts, label = _arc_parts(record, path, line)
    return make_example(stem.strip(), texts, label)


def _published_splits(task: str, directory: Path, names: list[str], convert: RowConverter) -> TaskData:
    """Train/validation/test from the three published files, in that order."""
    train, validation, test = (_read_jsonl_examples(path, convert) for path in require_files(directory, names, task))
    return TaskData(
        task,
        TaskKind.MULTIPLE_CHOICE,
        train,
        validation,
        test,
        label_names=letter_names(train + validation + test),
    )


@register_task("arc-easy")
def load_arc_easy(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """ARC-Easy from the ARC-V1-Feb2018 release files (published splits; `seed` is not needed)."""
    names = [f"ARC-Easy-{split}.jsonl" for split in ("Train", "Dev", "Test")]
    return _published_splits("arc-easy", benchmark_dir("arc-easy", data_dir), names, arc_example)


@register_task("arc-challenge")
def load_arc_challenge(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """ARC-Challenge from the ARC-V1-Feb2018 release files (published splits; `seed` is not needed)."""
    names = [f"ARC-Challenge-{split}.jsonl" for split in ("Train", "Dev", "Test")]
    return _published_splits("arc-challenge", benchmark_dir("arc-challenge", data_dir), names, arc_example)


@register_task("openbookqa")
def load_openbookqa(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """OpenBookQA from the release's `Data/Main/{train,dev,test}.jsonl` (published splits)."""
    names = ["train.jsonl", "dev.jsonl", "test.jsonl"]
    return _published_splits("openbookqa", benchmark_dir("openbookqa", data_dir), names, openbookqa_example)


def _read_json_or_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSONL rows, or the items of a JSON array (SciQ's release format; numbered by 1-based item index)."""
    if path.suffix == ".jsonl":
        yield from read_jsonl(path)
        return
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(path, error.lineno, f"expected a JSON array of objects ({error.msg})") from None
    if not isinstance(items, list) or not items:
        raise DataFormatError(path, 1, "expected a non-empty JSON array of objects")
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataFormatError(path, index, f"item {index}: expected a JSON object")
        yield index, item


def sciq_examples(path: Path, seed: int) -> list[Example]:
    """SciQ rows with the options in a seeded random order.

    The files list three distractors and the correct answer separately; lm-eval always puts the answer
    last. Scoring is per option so order does not matter there, but a constant label would make
    label-skew partitioning meaningless, so the gold position is shuffled (deterministically).
    """
    rng = random.Random(seed)
    examples = []
    for line, record in _read_json_or_jsonl(path):
        question = require_str(record, "question", path, line)
        correct = require_str(record, "correct_answer", path, line)
        options = [require_str(record, f"distractor{i}", path, line) for i in (1, 2, 3)]
        label = rng.randrange(4)
        options.insert(label, correct)
        support = record.get("support") or ""
        if not isinstance(support, str):
            raise DataFormatError(path, line, f"expected 'support' to be a string, got {support!r}")
        context = f"{support.strip()}\n" if support.strip() else ""
        examples.append(make_example(f"{context}Question: {question}\nAnswer:", options, label))
    return examples


@register_task("sciq")
def load_sciq(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """SciQ from the release's `train.json`, `valid.json`, `test.json` (or the same names as .jsonl)."""
    directory = benchmark_dir("sciq", data_dir)
    suffix = ".jsonl" if (directory / "train.jsonl").is_file() else ".json"
    paths = require_files(directory, [f"{split}{suffix}" for split in ("train", "valid", "test")], "sciq")
    train, validation, test = (sciq_examples(path, seed) for path in paths)
    return TaskData("sciq", TaskKind.MULTIPLE_CHOICE, train, validation, test, label_names=("A", "B", "C", "D"))


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow rows carry "[title]"/"[header]" scraping artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(record: dict[str, Any], path: Path, line: int) -> Example:
    activity = require_str(record, "activity_label", path, line)
    ctx_a = require_str(record, "ctx_a", path, line)
    ctx_b = record.get("ctx_b")
    if not isinstance(ctx_b, str):  # may be empty: the context is then all in ctx_a
        raise DataFormatError(path, line, f"expected a string field 'ctx_b', got {ctx_b!r}")
    endings = require_choices(record.get("endings"), path, line, "endings")
    label = require_label(record.get("label"), len(endings), path, line)
    prompt = hellaswag_clean(f"{activity}: {ctx_a} {ctx_b.capitalize()}")
    return make_example(prompt, [hellaswag_clean(ending) for ending in endings], label)


@register_task("hellaswag")
def load_hellaswag(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """HellaSwag from `hellaswag_train.jsonl` and `hellaswag_val.jsonl` (the official repo's data/).

    The official test labels are hidden, so, as lm-eval does, `test` is the published validation
    file; our validation split is 1,000 rows carved from train by `seed`.
    """
    train_path, val_path = require_files(
        benchmark_dir("hellaswag", data_dir), ["hellaswag_train.jsonl", "hellaswag_val.jsonl"], "hellaswag"
    )
    examples = _read_jsonl_examples(train_path, hellaswag_example)
    validation, train = carve(examples, [max(1, min(1000, len(examples) // 10))], seed)
    test = _read_jsonl_examples(val_path, hellaswag_example)
    return TaskData("hellaswag", TaskKind.MULTIPLE_CHOICE, train, validation, test, label_names=letter_names(test))
