from pathlib import Path

import pytest

from blindtune.data.task import DataFormatError, TaskData, TaskKind, load_task
from blindtune.data.wordnet import (
    DEFAULT_WORDNET_DIR,
    LEXNAMES,
    NOUN_CATEGORIES,
    VERB_CATEGORIES,
    Synset,
    definition,
    definition_examples,
    load_noun_supersense,
    load_verb_supersense,
    read_synsets,
)

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUN_LINE = (
    "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "
    '"the dog barked all night"  \n'
)
VERB_LINE = (
    "00001740 29 v 01 breathe 0 002 * 00005041 v 0000 + 03110323 a 0301 02 + 02 00 + 08 00 | "
    'draw air into, and expel out of, the lungs; "I can breathe better"  \n'
)
has_wordnet = pytest.mark.skipif(not (DEFAULT_WORDNET_DIR / "data.noun").is_file(), reason="wordnet-base missing")


def test_lexnames_match_the_documented_numbers() -> None:
    assert len(LEXNAMES) == 45
    expected = {"animal": 5, "plant": 20, "food": 13, "body": 8, "artifact": 6, "person": 18}
    expected |= {"location": 15, "substance": 27, "act": 4, "state": 26}
    assert {name: LEXNAMES.index(f"noun.{name}") for name in expected} == expected
    assert LEXNAMES[29] == "verb.body" and LEXNAMES[43] == "verb.weather"


def test_read_synsets_parses_noun_and_verb_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.mixed"
    path.write_text(HEADER + NOUN_LINE + VERB_LINE)
    dog, breathe = read_synsets(path)
    assert dog == Synset(5, ("dog", "domestic dog"), 'a member of the genus Canis; "the dog barked all night"')
    assert breathe.lex_filenum == 29 and breathe.words == ("breathe",)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (NOUN_LINE.replace(" 02 dog", " 0g dog"), "w_cnt"),  # bad hex
        (NOUN_LINE.replace(" 001 @", " 002 @"), "fields"),  # pointer count does not match
        (NOUN_LINE.replace(" | ", " "), "gloss"),
        (NOUN_LINE.replace("05 n", "77 n"), "lex_filenum"),
        (VERB_LINE.replace(" 02 + 02", " 03 + 02"), "fields"),  # frame count does not match
        ("02084071 05 n\n", "gloss"),
    ],
)
def test_malformed_lines_raise_with_line_number(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "data.noun"
    path.write_text(HEADER + NOUN_LINE + line)
    with pytest.raises(DataFormatError, match=problem) as error:
        list(read_synsets(path))
    assert error.value.line == 3
    assert "data.noun:3:" in str(error.value)


def test_missing_file_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        load_noun_supersense(tmp_path, seed=0)


def test_definition_drops_examples_and_headwords() -> None:
    synset = Synset(5, ("dog", "domestic dog"), 'a Dog; the domestic dog of man; "my dog barked"; "dogs"')
    assert definition(synset) == "a; the of man"
    assert definition(Synset(6, ("hotdog",), "a sandwich; not a dog")) == "a sandwich; not a dog"


@pytest.fixture(scope="module")
def nouns() -> TaskData:
    return load_noun_supersense(None, seed=0)


@has_wordnet
def test_noun_task_shape_and_prompt(nouns: TaskData) -> None:
    assert nouns.kind is TaskKind.MULTIPLE_CHOICE
    assert nouns.label_names == NOUN_CATEGORIES
    assert (len(nouns.train), len(nouns.validation), len(nouns.test)) == (6000, 200, 500)
    example = nouns.test[0]
    names = ", ".join(NOUN_CATEGORIES)
    assert example.prompt.startswith("Definition: ")
    assert example.prompt.endswith(f"\nCategory (one of: {names}):")
    assert example.choices == tuple(" " + name for name in NOUN_CATEGORIES)
    assert example.target == example.choices[example.label]


@has_wordnet
def test_noun_splits_are_balanced_and_disjoint(nouns: TaskData) -> None:
    for split, per_category in ((nouns.test, 50), (nouns.validation, 20), (nouns.train, 600)):
        assert [sum(e.label == label for e in split) for label in range(10)] == [per_category] * 10
    prompts = [{e.prompt for e in split} for split in (nouns.train, nouns.validation, nouns.test)]
    assert sum(map(len, prompts)) == len(set().union(*prompts)) == 6700


@has_wordnet
def test_noun_splits_depend_only_on_seed(nouns: TaskData) -> None:
    assert load_task("wordnet-supersense", seed=0) == nouns
    other = load_noun_supersense(None, seed=1)
    assert other.test != nouns.test and other.train != nouns.train


@has_wordnet
def test_verb_task_uses_its_own_categories() -> None:
    verbs = load_verb_supersense(None, seed=0)
    assert verbs.label_names == VERB_CATEGORIES
    assert (len(verbs.validation), len(verbs.test)) == (200, 500)
    assert 5000 < len(verbs.train) <= 6000
    assert verbs.test[0].prompt.endswith(f"(one of: {', '.join(VERB_CATEGORIES)}):")


@has_wordnet
def test_definition_task_offers_the_defined_noun_and_three_others() -> None:
    task = load_task("wordnet-definition", seed=0)
    assert (len(task.train), len(task.validation), len(task.test)) == (6000, 200, 500)
    prompts = [{e.prompt for e in split} for split in (task.train, task.validation, task.test)]
    assert sum(map(len, prompts)) == len(set().union(*prompts))  # disjoint splits
    labels = [e.label for e in task.test]
    assert all(labels.count(label) > 90 for label in range(4))  # the gold position is shuffled
    for example in task.test:
        assert len(set(example.choices)) == 4 and example.target == example.choices[example.label]
        assert example.prompt.startswith("Definition: ") and example.prompt.endswith("\nWord:")
        assert example.target.strip().lower() not in example.prompt.lower().split()  # headword removed
    assert load_task("wordnet-definition", seed=0) == task
    assert load_task("wordnet-definition", seed=1).test != task.test


def test_definition_task_refuses_too_few_nouns() -> None:
    synsets = [Synset(5, (word,), f"a thing called number {i} in the list") for i, word in enumerate(("cat", "dog"))]
    with pytest.raises(ValueError, match="too few distinct nouns"):
        definition_examples(iter(synsets), seed=0)
