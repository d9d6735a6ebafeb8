"""Supersense classification built at run time from the WordNet 3.0 database files.

The default demo task must work offline with no downloads, and Debian's `wordnet-base` package puts
WordNet on every machine we run on. Each synset's lexicographer file (noun.animal, verb.motion, ...) is
a coarse category a human assigned, so "which category does this definition describe?" is a clean,
balanced multiple-choice task with single-token answers and zero download cost.

One parser reads both `data.noun` and `data.verb`; two registrations pick different categories.
A third task, `wordnet-definition`, asks which of four nouns a definition defines: small models are
well above chance there (supersenses are hard for them), so capability measurements have room to fall.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from blindtune.data.task import DataFormatError, Example, TaskData, TaskKind, register_task

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")

# WordNet 3.0 `lexnames`: the lexicographer file of each lex_filenum (0..44). Embedded because Debian's
# wordnet-base does not ship the lexnames file itself.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip

# Ten concrete, mutually distinct noun categories with thousands of synsets each.
NOUN_CATEGORIES = (
    "act", "animal", "artifact", "body", "food",
    "location", "person", "plant", "state", "substance",
)  # fmt: skip
# The ten most frequent verb files except verb.stative, whose label word is two tokens (" st"+"ative")
# in SmolLM2's tokenizer and whose synsets ("be", "seem") overlap every other category.
VERB_CATEGORIES = (
    "body", "change", "cognition", "communication", "contact",
    "creation", "motion", "perception", "possession", "social",
)  # fmt: skip

DEFINITION_OPTIONS = 4  # the defined noun and three others
DEFINITION_SPLIT_SIZES = (500, 200, 6000)  # test, validation, train
TEST_PER_CATEGORY = 50
VALIDATION_PER_CATEGORY = 20
TRAIN_CAP = 6000  # split evenly: at most TRAIN_CAP // num_categories per category
MIN_DEFINITION_WORDS = 3
SYNSET_TYPES = ("n", "v", "a", "s", "r")


@dataclass(frozen=True)
class Synset:
    """The parts of one data-file line that the tasks use."""

    lex_filenum: int
    words: tuple[str, ...]  # lemmas with underscores turned into spaces
    gloss: str


def read_synsets(path: Path) -> Iterator[Synset]:
    """Parse a WordNet 3.0 `data.<pos>` file (format: wndb(5WN)); malformed lines raise DataFormatError."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: install WordNet 3.0 with `apt-get install wordnet-base` "
            "or pass data_dir pointing at a directory holding data.noun and data.verb"
        )
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.startswith("  "):  # the licence header
                continue
            yield _parse_line(line, path, line_number)


def _parse_line(line: str, path: Path, line_number: int) -> Synset:
    """Check the field counts the format fixes, so a truncated or shifted line is never half-read."""
    head, bar, gloss = line.partition(" | ")
    if not bar:
        raise DataFormatError(path, line_number, "expected ' | ' followed by the gloss")
    fields = head.split()
    if len(fields) < 4:
        raise DataFormatError(path, line_number, "expected synset_offset lex_filenum ss_type w_cnt ...")
    if fields[2] not in SYNSET_TYPES:
        raise DataFormatError(path, line_number, f"expected ss_type in {SYNSET_TYPES}, got {fields[2]!r}")
    lex_filenum = _parse_int(fields[1], 10, "lex_filenum", path, line_number)
    if not 0 <= lex_filenum < len(LEXNAMES):
        raise DataFormatError(path, line_number, f"expected lex_filenum in 0..44, got {lex_filenum}")
    word_count = _parse_int(fields[3], 16, "w_cnt (hex)", path, line_number)
    words_end = 4 + 2 * word_count
    pointer_count = _parse_int(_field(fields, words_end, path, line_number), 10, "p_cnt", path, line_number)
    expected = words_end + 1 + 4 * pointer_count
    if fields[2] == "v":  # verbs add generic sentence frames: f_cnt, then "+ f_num w_num" per frame
        frame_count = _parse_int(_field(fields, expected, path, line_number), 10, "f_cnt", path, line_number)
        expected += 1 + 3 * frame_count
    if len(fields) != expected:
        raise DataFormatError(
            path,
            line_number,
            f"expected {expected} fields before the gloss for {word_count} words, got {len(fields)}",
        )
    words = tuple(fields[i].replace("_", " ") for i in range(4, words_end, 2))
    return Synset(lex_filenum=lex_filenum, words=words, gloss=gloss.strip())


def _field(fields: list[str], index: int, path: Path, line_number: int) -> str:
    if index >= len(fields):
        raise DataFormatError(path, line_number, f"line ends after {len(fields)} fields, expected more")
    return fields[index]


def _parse_int(text: str, base: int, what: str, path: Path, line_number: int) -> int:
    # int() alone would also accept signs and underscores, which no valid data file contains.
    if not (text.isascii() and text.isalnum()):
        raise DataFormatError(path, line_number, f"expected {what}, got {text!r}")
    try:
        return int(text, base)
    except ValueError:
        raise DataFormatError(path, line_number, f"expected {what}, got {text!r}") from None


def definition(synset: Synset) -> str:
    """The gloss without its quoted usage examples and without the synset's own words.

    Examples come after the definition as `; "..."` pieces. The headwords are removed (whole word,
    any case) because "a dog is a domesticated dog" would let the model answer from the name alone.
    """
    pieces: list[str] = []
    for piece in synset.gloss.split(";"):
        if piece.strip().startswith('"'):
            break
        pieces.append(piece)
    text = ";".join(pieces)
    lowered = text.lower()
    present = [word for word in synset.words if word.lower() in lowered]
    if present:  # a per-synset regex is slow, so build one only when a headword can occur at all
        alternatives = "|".join(re.escape(word) for word in sorted(present, key=len, reverse=True))
        text = re.sub(rf"(?<!\w)(?:{alternatives})(?!\w)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\s+([,;:.)])", r"\1", text)
    return " ".join(text.split()).strip(" ,;:")


def make_prompt(definition_text: str, names: Sequence[str]) -> str:
    return f"Definition: {definition_text}\nCategory (one of: {', '.join(names)}):"


def category_examples(synsets: Iterator[Synset], pos: str, names: Sequence[str]) -> list[list[Example]]:
    """Examples per category, in file order, after the documented filters.

    Filters: definitions shorter than MIN_DEFINITION_WORDS words (too little to classify); repeated
    definitions (kept once, so a test prompt never also appears in train); definitions shared by
    synsets of different categories (dropped: no single right answer).
    """
    wanted = {LEXNAMES.index(f"{pos}.{name}"): label for label, name in enumerate(names)}
    choices = tuple(" " + name for name in names)
    labels_by_text: dict[str, set[int]] = defaultdict(set)
    for synset in synsets:
        label = wanted.get(synset.lex_filenum)
        if label is None:
            continue
        text = definition(synset)
        if len(text.split()) >= MIN_DEFINITION_WORDS:
            labels_by_text[text].add(label)
    per_category: list[list[Example]] = [[] for _ in names]
    for text, labels in labels_by_text.items():  # dicts keep insertion (file) order
        if len(labels) == 1:
            label = next(iter(labels))
            per_category[label].append(
                Example(prompt=make_prompt(text, names), target=choices[label], choices=choices, label=label)
            )
    return per_category


def split_balanced(per_category: list[list[Example]], seed: int) -> tuple[list[Example], ...]:
    """Balanced test and validation sets; train capped evenly per category.

    Test and validation hold the same count of every category, so accuracy is not dominated by the
    big files (artifact, person). Train takes at most TRAIN_CAP // num_categories per category: a
    balanced train set keeps training fast and stops a model scoring well by always saying "artifact";
    a category with fewer synsets keeps all it has (four verb categories have 340..559).
    """
    rng = random.Random(seed)
    per_category_train = TRAIN_CAP // len(per_category)
    train: list[Example] = []
    validation: list[Example] = []
    test: list[Example] = []
    held_out = TEST_PER_CATEGORY + VALIDATION_PER_CATEGORY
    for examples in per_category:
        if len(examples) <= held_out:
            raise ValueError(f"only {len(examples)} examples in a category; need more than {held_out}")
        order = list(examples)
        rng.shuffle(order)
        test.extend(order[:TEST_PER_CATEGORY])
        validation.extend(order[TEST_PER_CATEGORY:held_out])
        train.extend(order[held_out : held_out + per_category_train])
    for split in (train, validation, test):
        rng.shuffle(split)
    return train, validation, test


def load_supersense(name: str, pos: str, names: Sequence[str], data_dir: Path | None, seed: int) -> TaskData:
    """Build a supersense task from `data.<pos>` under `data_dir` (default /usr/share/wordnet)."""
    path = (data_dir if data_dir is not None else DEFAULT_WORDNET_DIR) / f"data.{pos}"
    per_category = category_examples(read_synsets(path), pos, names)
    train, validation, test = split_balanced(per_category, seed)
    return TaskData(
        name=name,
        kind=TaskKind.MULTIPLE_CHOICE,
        train=train,
        validation=validation,
        test=test,
        label_names=tuple(names),
    )


@register_task("wordnet-supersense")
def load_noun_supersense(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """Which of 10 noun categories (animal, food, ...) a WordNet definition describes."""
    return load_supersense("wordnet-supersense", "noun", NOUN_CATEGORIES, data_dir, seed)


@register_task("wordnet-verb-supersense")
def load_verb_supersense(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """Which of 10 verb categories (motion, communication, ...) a WordNet definition describes."""
    return load_supersense("wordnet-verb-supersense", "verb", VERB_CATEGORIES, data_dir, seed)


def definition_examples(synsets: Iterator[Synset], seed: int) -> list[Example]:
    """ "Which word is defined?" examples, one per synset with a one-word lemma, in file order.

    The gold option is the synset's first lemma made of letters only; the three distractors are drawn
    (seeded) from the other synsets' gold words, never one of this synset's own lemmas. Definitions
    shared by several synsets are dropped (no single right answer).
    """
    rng = random.Random(seed)
    words_by_text: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
    for synset in synsets:
        word = next((w for w in synset.words if w.isalpha() and w.isascii()), None)
        text = definition(synset)
        if word is not None and len(text.split()) >= MIN_DEFINITION_WORDS:
            words_by_text[text].append((word, synset.words))
    pool = [(text, entries[0]) for text, entries in words_by_text.items() if len(entries) == 1]
    vocabulary = sorted({word for _, (word, _) in pool})
    examples = []
    for text, (word, lemmas) in pool:
        own = {lemma.lower() for lemma in lemmas}
        distractors: list[str] = []
        for _ in range(1000):  # a tiny or degenerate data file must fail, not loop forever
            if len(distractors) == DEFINITION_OPTIONS - 1:
                break
            other = vocabulary[rng.randrange(len(vocabulary))]
            if other.lower() not in own and other not in distractors:
                distractors.append(other)
        if len(distractors) < DEFINITION_OPTIONS - 1:
            raise ValueError(f"too few distinct nouns to draw {DEFINITION_OPTIONS - 1} distractors for {word!r}")
        options = [word, *distractors]
        rng.shuffle(options)
        choices = tuple(" " + option for option in options)
        label = options.index(word)
        examples.append(
            Example(prompt=f"Definition: {text}\nWord:", target=choices[label], choices=choices, label=label)
        )
    return examples


@register_task("wordnet-definition")
def load_noun_definitions(data_dir: Path | None = None, seed: int = 0) -> TaskData:
    """Which of four nouns a WordNet definition defines (the noun's own words removed from it)."""
    path = (data_dir if data_dir is not None else DEFAULT_WORDNET_DIR) / "data.noun"
    examples = definition_examples(read_synsets(path), seed)
    test_size, validation_size, train_cap = DEFINITION_SPLIT_SIZES
    if len(examples) <= test_size + validation_size:
        raise ValueError(f"only {len(examples)} definitions in {path}; need more than {test_size + validation_size}")
    random.Random(seed).shuffle(examples)
    held_out = test_size + validation_size
    return TaskData(
        name="wordnet-definition",
        kind=TaskKind.MULTIPLE_CHOICE,
        train=examples[held_out : held_out + train_cap],
        validation=examples[test_size:held_out],
        test=examples[:test_size],
    )
