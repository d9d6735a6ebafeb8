"""What FedMKT's two sides exchange and learn from: top-K distributions on the public set, per-sequence
losses, the selection of teachers, and distillation with (1 - kd_alpha) * LM + kd_alpha * KD.

A public sequence is a (prompt, reference continuation) pair tokenised as in training; knowledge is the
model's top-K next-token distribution at every position that predicts a continuation token, plus the
model's loss on the continuation. Losses are summed negative log-likelihoods divided by the
continuation's length in characters, so models with different tokenizers are compared on one scale.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from blindtune.data import Example
from blindtune.encoding import collate_pairs, encode_pair, last_hidden_states, vocab_logprobs
from blindtune.federation.records import record_to_tensors, tensors_to_record
from blindtune.methods.fedmkt.config import Selection
from blindtune.methods.fedmkt.token_alignment import (
    PAD_INDEX,
    NonFiniteKnowledgeError,
    TopK,
    VocabMap,
    align_topk,
    canonical_tokens,
    check_finite,
    lowercases,
    remap_topk,
    top_k,
)
from blindtune.training.loop import NonFiniteLossError

# Arrays of a RecordKey.KNOWLEDGE record.
INDICES = "indices"  # (positions, K) int32: token ids, PAD_INDEX (-1) for padding
LOGITS = "logits"  # (positions, K) float32: the kept logits (client -> server) or log-probabilities (server -> client)
LENGTHS = "lengths"  # (sequences,) int32: positions (continuation tokens) per public sequence
LOSSES = "losses"  # (sequences,) float32: the sender's loss on each sequence's continuation (nats per character)

Encoded = list[tuple[list[int], int]]  # per public sequence: token ids and where the continuation starts


# ---- the public set ------------------------------------------------------------------------------


def public_to_record(examples: Sequence[Example]) -> ConfigRecord:
    return ConfigRecord({"prompts": [e.prompt for e in examples], "targets": [e.target for e in examples]})


def public_from_record(record: ConfigRecord) -> list[Example]:
    prompts, targets = record.get("prompts"), record.get("targets")
    if not isinstance(prompts, list) or not isinstance(targets, list) or len(prompts) != len(targets):
        raise ValueError("the public set record needs equally long lists 'prompts' and 'targets'")
    return [Example(prompt=str(p), target=str(t)) for p, t in zip(prompts, targets, strict=True)]


def tokenizer_to_record(tokenizer: PreTrainedTokenizerBase) -> ConfigRecord:
    """A tokenizer as text: its tokenizer.json and named special tokens (a vocabulary is not private)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("FedMKT needs fast (Rust) tokenizers, which serialise as JSON")
    special = {
        key: str(value)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
        if (value := getattr(tokenizer, key, None)) is not None
    }
    return ConfigRecord({"json": backend.to_str(), "special_tokens": json.dumps(special)})


def tokenizer_from_record(record: ConfigRecord) -> PreTrainedTokenizerBase:
    if "json" not in record or "special_tokens" not in record:
        raise ValueError("the tokenizer record needs 'json' and 'special_tokens'")
    special = json.loads(str(record["special_tokens"]))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(str(record["json"])), **special)


def encode_public(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> Encoded:
    # Distillation needs no whole answer: a long one (some PIQA solutions) is cut, not refused.
    return [encode_pair(tokenizer, e.prompt, e.target, max_length, cut_continuation=True) for e in examples]


def continuation_ids(encoded: Encoded) -> list[list[int]]:
    return [ids[start:] for ids, start in encoded]


# ---- knowledge -----------------------------------------------------------------------------------


@dataclass
class Knowledge:
    """Top-K rows of every continuation position, sequence after sequence, and per-sequence losses."""

    topk: TopK
    lengths: np.ndarray  # (sequences,) int
    losses: np.ndarray  # (sequences,) float32

    def __post_init__(self) -> None:
        if int(self.lengths.sum()) != self.topk.indices.shape[0] or (self.lengths < 0).any():
            raise ValueError(
                f"lengths sum to {int(self.lengths.sum())}, but there are {self.topk.indices.shape[0]} rows"
            )
        if self.losses.shape != self.lengths.shape:
            raise ValueError(f"{self.losses.shape[0]} losses for {self.lengths.shape[0]} sequences")
        check_finite(self.losses, "sequence losses")

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])

    def sequence(self, index: int) -> TopK:
        start, end = self.offsets[index], self.offsets[index + 1]
        return TopK(self.topk.indices[start:end], self.topk.logits[start:end])

    def to_record(self) -> ArrayRecord:
        return tensors_to_record(
            {
                INDICES: torch.from_numpy(self.topk.indices.astype(np.int32)),
                LOGITS: torch.from_numpy(self.topk.logits.astype(np.float32)),
                LENGTHS: torch.from_numpy(self.lengths.astype(np.int32)),
                LOSSES: torch.from_numpy(self.losses.astype(np.float32)),
            }
        )

    @classmethod
    def from_record(cls, record: ArrayRecord, expected_lengths: Sequence[int], vocab_size: int) -> Knowledge:
        """Parse and validate received knowledge against the receiver's view of the public set."""
        tensors = record_to_tensors(record)
        missing = {INDICES, LOGITS, LENGTHS, LOSSES} - set(tensors)
        if missing:
            raise ValueError(f"knowledge record lacks {sorted(missing)}")
        lengths = tensors[LENGTHS].numpy().astype(np.int64)
        if lengths.tolist() != list(expected_lengths):
            raise ValueError(
                f"knowledge covers {len(lengths)} sequences / {int(lengths.sum())} positions; expected "
                f"{len(expected_lengths)} / {sum(expected_lengths)} (a different public set or tokenisation)"
            )
        indices = tensors[INDICES].numpy().astype(np.int32)
        if indices.size and (indices.max() >= vocab_size or indices.min() < PAD_INDEX):
            raise ValueError(f"knowledge token ids outside [0, {vocab_size})")
        topk = TopK(indices, tensors[LOGITS].numpy().astype(np.float32))
        return cls(topk, lengths, tensors[LOSSES].numpy().astype(np.float32))


def continuation_lengths(encoded: Encoded) -> list[int]:
    return [len(ids) - start for ids, start in encoded]


def _characters(examples: Sequence[Example]) -> np.ndarray:
    return np.array([max(1, len(e.target.strip())) for e in examples], dtype=np.float64)


def extract_knowledge(
    model: nn.Module,
    encoded: Encoded,
    examples: Sequence[Example],
    pad_id: int,
    k: int,
    batch_size: int = 8,
) -> Knowledge:
    """The model's top-K logits at every continuation position and its loss per sequence (float32)."""
    rows: list[TopK] = []
    nll = np.zeros(len(encoded), dtype=np.float64)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for first in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[first : first + batch_size], pad_id)
            logprobs, targets, rows_of = _continuation_logprobs(model, batch)
            logits = logprobs  # log-softmax keeps the logits' order and differences within a row
            check_finite(logits, "public-set logits")
            rows.append(top_k(logits, k))
            token_nll = -logprobs.gather(-1, targets[:, None]).squeeze(-1).double()
            np.add.at(nll, first + rows_of.numpy(), token_nll.cpu().numpy())
    model.train(was_training)
    losses = (nll / _characters(examples)).astype(np.float32)
    lengths = np.array(continuation_lengths(encoded), dtype=np.int64)
    indices = np.concatenate([r.indices for r in rows]) if rows else np.zeros((0, k), np.int32)
    logits_all = np.concatenate([r.logits for r in rows]) if rows else np.zeros((0, k), np.float32)
    return Knowledge(TopK(indices, logits_all), lengths, losses)


def _continuation_logprobs(model: nn.Module, batch: object) -> tuple[Tensor, Tensor, Tensor]:
    """Full-vocabulary log-probabilities (float32) at the positions predicting continuation tokens,
    the tokens they predict, and the batch row of each."""
    spans = batch.spans  # type: ignore[attr-defined]
    input_ids = batch.input_ids  # type: ignore[attr-defined]
    hidden = last_hidden_states(model, input_ids, batch.attention_mask)  # type: ignore[attr-defined]
    rows = torch.cat([torch.full((end - start,), row) for row, (start, end) in enumerate(spans)])
    positions = torch.cat([torch.arange(start, end) for start, end in spans])
    selected = hidden[rows.to(hidden.device), (positions - 1).to(hidden.device)]
    return vocab_logprobs(model, selected), input_ids[rows, positions].to(hidden.device), rows


def carry_knowledge(
    knowledge: Knowledge,
    sender: PreTrainedTokenizerBase,
    sender_encoded: Encoded,
    receiver: PreTrainedTokenizerBase,
    receiver_encoded: Encoded,
    vocab_map: VocabMap,
    temperature: float,
) -> tuple[Knowledge, float]:
    """The sender's knowledge in the receiver's tokenisation and vocabulary, as log-probabilities.

    Returns it and the share of the receiver's positions that carry the sender's distribution (the
    rest fall back to the receiver's own token).
    """
    same_tokens = continuation_ids(sender_encoded) == continuation_ids(receiver_encoded)
    if not (vocab_map.is_identity and same_tokens):
        lowercase = lowercases(sender) or lowercases(receiver)
        sequences, aligned = [], 0
        for index, (sender_ids, receiver_ids) in enumerate(
            zip(continuation_ids(sender_encoded), continuation_ids(receiver_encoded), strict=True)
        ):
            rows, matched = align_topk(
                knowledge.sequence(index),
                canonical_tokens(sender, sender_ids, lowercase),
                canonical_tokens(receiver, receiver_ids, lowercase),
                receiver_ids,
                vocab_map,
                temperature,
            )
            sequences.append(rows)
            aligned += matched
        topk = TopK(np.concatenate([s.indices for s in sequences]), np.concatenate([s.logits for s in sequences]))
        lengths = np.array(continuation_lengths(receiver_encoded), dtype=np.int64)
        return Knowledge(topk, lengths, knowledge.losses), aligned / max(1, int(lengths.sum()))
    # Same tokenisation: only the renormalisation over the kept entries.
    return Knowledge(remap_topk(knowledge.topk, vocab_map, temperature), knowledge.lengths, knowledge.losses), 1.0


# ---- selection -----------------------------------------------------------------------------------


def teacher_weights(
    student_losses: np.ndarray,
    teacher_losses: np.ndarray,
    selection: Selection = Selection.BEST,
    temperature: float = 1.0,
) -> np.ndarray:
    """Per teacher and sequence, the weight of that teacher's distribution in the student's KD target.

    A teacher counts for a sequence only if its loss on the reference continuation is strictly lower
    than the student's own; among those, `best` gives all weight to the lowest loss (first on ties),
    `softmax` weights them by softmax(-loss / temperature). A sequence without a better teacher gets
    all-zero weights (the student keeps learning from the reference alone there).
    """
    teacher_losses = np.atleast_2d(np.asarray(teacher_losses, dtype=np.float64))
    student_losses = np.asarray(student_losses, dtype=np.float64)
    if teacher_losses.shape[1] != student_losses.shape[0]:
        raise ValueError(f"teacher losses {teacher_losses.shape} do not cover {student_losses.shape[0]} sequences")
    for what, values in (("student", student_losses), ("teacher", teacher_losses)):
        if not np.isfinite(values).all():
            raise NonFiniteKnowledgeError(f"{what} losses hold NaN or Inf values")
    better = teacher_losses < student_losses[None, :]
    weights = np.zeros_like(teacher_losses)
    if selection is Selection.BEST:
        masked = np.where(better, teacher_losses, np.inf)
        best = masked.argmin(axis=0)
        columns = np.nonzero(better.any(axis=0))[0]
        weights[best[columns], columns] = 1.0
        return weights
    scores = np.where(better, -teacher_losses / temperature, -np.inf)
    top = scores.max(axis=0, keepdims=True)
    exp = np.where(better, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = exp.sum(axis=0, keepdims=True)
    return np.divide(exp, total, out=np.zeros_like(exp), where=total > 0)


@dataclass
class Target:
    """One sequence's KD target: per continuation position, token ids and their probabilities."""

    indices: Tensor  # (positions, entries) long; padding points at token 0 with probability 0
    probabilities: Tensor  # (positions, entries) float32, rows sum to 1


def kd_targets(teachers: Sequence[Knowledge], weights: np.ndarray) -> list[Target | None]:
    """Per sequence, the weighted mixture of the chosen teachers' distributions (None: no teacher).

    The teachers' rows are log-probabilities in the student's vocabulary and tokenisation."""
    targets: list[Target | None] = []
    for sequence in range(weights.shape[1]):
        chosen = [(t, float(w)) for t, w in zip(teachers, weights[:, sequence], strict=True) if w > 0]
        if not chosen:
            targets.append(None)
            continue
        indices, probabilities = [], []
        for teacher, weight in chosen:
            rows = teacher.sequence(sequence)
            indices.append(np.where(rows.indices >= 0, rows.indices, 0))
            probabilities.append(rows.probabilities() * weight)
        targets.append(
            Target(
                torch.from_numpy(np.concatenate(indices, axis=1).astype(np.int64)),
                torch.from_numpy(np.concatenate(probabilities, axis=1).astype(np.float32)),
            )
        )
    return targets


# ---- distillation --------------------------------------------------------------------------------


@dataclass
class DistilStats:
    mean_loss: float
    steps: int
    kd_positions: int  # continuation positions trained towards a teacher's distribution
    tokens: int
    seconds: float


def distil(
    model: nn.Module,
    encoded: Encoded,
    targets: Sequence[Target | None],
    pad_id: int,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    kd_alpha: float,
    seed: int,
) -> DistilStats:
    """AdamW on the trainable parameters: (1 - kd_alpha) * LM + kd_alpha * KD over public sequences.

    The KD term is the cross-entropy to the teacher's distribution where a teacher was chosen, and to
    the reference token elsewhere (so a sequence without a better teacher is plain LM training).
    """
    if len(targets) != len(encoded):
        raise ValueError(f"{len(targets)} KD targets for {len(encoded)} public sequences")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(len(encoded)))
        rng.shuffle(epoch)
        order += epoch
    losses: list[float] = []
    kd_positions = tokens = 0
    started = time.perf_counter()
    was_training = model.training
    model.train()
    for step in range(steps):
        chosen = order[step * batch_size : (step + 1) * batch_size]
        batch = collate_pairs([encoded[i] for i in chosen], pad_id)
        logprobs, reference, rows = _continuation_logprobs(model, batch)
        lm = -logprobs.gather(-1, reference[:, None]).squeeze(-1)
        kd = lm.clone()
        offset = 0
        for row, sequence in enumerate(chosen):
            count = int((rows == row).sum())
            target = targets[sequence]
            if target is not None:
                if target.indices.shape[0] != count:
                    raise ValueError(f"sequence {sequence}: KD target has {target.indices.shape[0]} rows, not {count}")
                picked = logprobs[offset : offset + count].gather(-1, target.indices.to(logprobs.device))
                kd[offset : offset + count] = -(target.probabilities.to(logprobs.device) * picked).sum(-1)
                kd_positions += count
            offset += count
        loss = (1 - kd_alpha) * lm.mean() + kd_alpha * kd.mean()
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"distillation loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens += int(batch.attention_mask.sum())
    model.train(was_training)
    return DistilStats(
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        steps=steps,
        kd_positions=kd_positions,
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )
