"""Membership inference on an adapted model: did this example take part in training?

Two standard attacks, each a score per example (higher = "member"):

- loss (Yeom et al. 2018): the negative loss of the example's target under the adapted model;
- reference-model loss ratio (Carlini et al. 2021; Watson et al. 2022): the adapted model's loss
  divided by a reference model's loss on the same example, negated. The reference (here the LLM
  before adaptation) calibrates away how hard each example is by itself, which is most of what the
  plain loss attack measures.

Members are client training examples, non-members held-out examples of the same task; the attack's
quality is its ROC-AUC (0.5: no better than chance) and its true-positive rate at a 1% false-positive
rate (what an attacker who must rarely be wrong can find), the AUC with a bootstrap 95% interval.
Members are drawn from the examples the clients recorded as trained on (not whole partitions: a
client's steps x batch size may not cover its partition).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.encoding import collate_pairs, continuation_logprobs, encode_pair


def roc_auc(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting half (Mann-Whitney U)."""
    members = np.asarray(member_scores, dtype=float)
    nonmembers = np.asarray(nonmember_scores, dtype=float)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("ROC-AUC needs at least one member and one non-member")
    u = scipy.stats.mannwhitneyu(members, nonmembers, alternative="two-sided").statistic
    return float(u / (members.size * nonmembers.size))


def auc_interval(
    member_scores: np.ndarray, nonmember_scores: np.ndarray, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval of the ROC-AUC, members and non-members resampled independently."""
    result = scipy.stats.bootstrap(
        (member_scores, nonmember_scores),
        _auc_rows,
        paired=False,
        vectorized=True,
        n_resamples=1000,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _auc_rows(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    u = scipy.stats.mannwhitneyu(members, nonmembers, alternative="two-sided", axis=axis).statistic
    return np.asarray(u / (members.shape[axis] * nonmembers.shape[axis]))


def tpr_at_fpr(
    member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray, fpr: float = 0.01
) -> float:
    """The largest fraction of members flagged by a threshold that flags at most `fpr` of non-members."""
    members = np.asarray(member_scores, dtype=float)
    nonmembers = np.sort(np.asarray(nonmember_scores, dtype=float))[::-1]
    allowed = int(np.floor(fpr * nonmembers.size))  # non-members that may score above the threshold
    # Flag scores strictly above the (allowed+1)-th highest non-member score.
    threshold = nonmembers[allowed] if allowed < nonmembers.size else -np.inf
    return float((members > threshold).mean())


@torch.no_grad()
def example_losses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    batch_size: int = 16,
) -> list[float]:
    """Each example's mean negative log-likelihood of its target (the training objective, per example)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate_pairs([encode_pair(tokenizer, e.prompt, e.target, max_length) for e in chunk], pad_id)
            losses += [float(-lp.float().mean()) for lp in continuation_logprobs(model, batch)]
    finally:
        model.train(was_training)
    return losses


def attack_figures(
    member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    members = np.asarray(member_scores, dtype=float)
    nonmembers = np.asarray(nonmember_scores, dtype=float)
    low, high = auc_interval(members, nonmembers)
    return {
        "auc": roc_auc(members, nonmembers),
        "auc_95ci": [low, high],  # bootstrap over members and non-members
        "tpr_at_1pct_fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.01),
        "tpr_at_10pct_fpr": tpr_at_fpr(member_scores, nonmember_scores, 0.10),
    }


def membership_inference(
    target_losses: tuple[Sequence[float], Sequence[float]],
    reference_losses: tuple[Sequence[float], Sequence[float]] | None,
) -> dict[str, Any]:
    """Both attacks from per-example losses: ((members), (non-members)) under the target and reference."""
    members, nonmembers = (np.asarray(losses, dtype=float) for losses in target_losses)
    result: dict[str, Any] = {
        "members": int(members.size),
        "nonmembers": int(nonmembers.size),
        "mean_loss_members": float(members.mean()),
        "mean_loss_nonmembers": float(nonmembers.mean()),
        "loss": attack_figures(-members, -nonmembers),
    }
    if reference_losses is not None:
        ref_members, ref_nonmembers = (np.maximum(np.asarray(x, dtype=float), 1e-6) for x in reference_losses)
        result["loss_ratio"] = attack_figures(-members / ref_members, -nonmembers / ref_nonmembers)
    return result
