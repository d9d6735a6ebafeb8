"""Aggregation of client adapter states into the next global state.

Every aggregator first screens the updates: a state with NaN/Inf values, the wrong names or shapes,
or an update (state minus the global state it started from) whose norm is absurd compared with the
others is rejected and reported, never averaged in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blindtune.models.adapters import AdapterState, IncompatibleAdapterError, check_compatible


@dataclass
class ClientUpdate:
    node_id: int
    state: AdapterState
    num_examples: int


@dataclass
class Rejection:
    node_id: int
    reason: str


def update_norm(state: AdapterState, reference: AdapterState) -> float:
    return math.sqrt(sum(float((state[k].float() - reference[k].float()).pow(2).sum()) for k in reference))


def screen(
    updates: list[ClientUpdate], global_state: AdapterState, max_norm_ratio: float
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Keep the updates that are finite, fit the global state, and whose update norm is at most
    `max_norm_ratio` times the median norm of the finite ones."""
    shapes = {name: tuple(t.shape) for name, t in global_state.items()}
    valid: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    for update in updates:
        try:
            check_compatible(update.state, shapes)
        except IncompatibleAdapterError as error:
            rejected.append(Rejection(update.node_id, str(error)))
            continue
        if update.num_examples <= 0:
            rejected.append(Rejection(update.node_id, f"reported {update.num_examples} examples"))
            continue
        valid.append(update)
    norms = [update_norm(u.state, global_state) for u in valid]
    return split_outliers(valid, norms, max_norm_ratio, rejected)


def split_outliers(
    updates: list[ClientUpdate], norms: list[float], max_norm_ratio: float, rejected: list[Rejection]
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Reject updates whose norm exceeds `max_norm_ratio` x the median (needs >= 3 to say what is absurd)."""
    if len(updates) < 3:
        return updates, rejected
    median = sorted(norms)[len(norms) // 2]
    kept = []
    for update, norm in zip(updates, norms, strict=True):
        if median > 0 and norm > max_norm_ratio * median:
            rejected.append(Rejection(update.node_id, f"update norm {norm:.3g} > {max_norm_ratio} x median"))
        else:
            kept.append(update)
    return kept, rejected


def fedavg(updates: list[ClientUpdate]) -> AdapterState:
    """Example-weighted mean of the client states (FedAvg)."""
    if not updates:
        raise ValueError("nothing to aggregate")
    total = sum(u.num_examples for u in updates)
    aggregate: AdapterState = {}
    for name, reference in updates[0].state.items():
        mean = torch.zeros(reference.shape, dtype=torch.float64)
        for update in updates:
            mean += update.state[name].double() * (update.num_examples / total)
        aggregate[name] = mean.to(reference.dtype)
    return aggregate
