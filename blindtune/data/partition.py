"""Split one task's training examples across federated clients (data owners).

IID partitioning is the easy baseline; Dirichlet label skew (Hsu et al. 2019, "Measuring the effects
of non-identical data distribution") is the standard way to simulate organisations whose data covers
the label space unevenly: smaller alpha, more skew.
"""

from __future__ import annotations

import enum
import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from blindtune.data.task import Example

MAX_DIRICHLET_DRAWS = 100


class PartitionScheme(enum.StrEnum):
    IID = "iid"
    DIRICHLET = "dirichlet"


def _check_client_count(examples: Sequence[Example], num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > len(examples):
        raise ValueError(f"cannot give {num_clients} clients at least one example each from {len(examples)}")


def partition_iid(examples: Sequence[Example], num_clients: int, seed: int) -> list[list[Example]]:
    """Shuffle by seed and deal out contiguous shares whose sizes differ by at most one."""
    _check_client_count(examples, num_clients)
    order = list(examples)
    random.Random(seed).shuffle(order)
    base, extra = divmod(len(order), num_clients)
    shares = []
    start = 0
    for client in range(num_clients):
        size = base + (1 if client < extra else 0)
        shares.append(order[start : start + size])
        start += size
    return shares


def partition_dirichlet(
    examples: Sequence[Example], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[Example]]:
    """Label skew: each label's examples go to clients in proportions drawn from Dirichlet(alpha).

    A small alpha can leave a client with (almost) nothing, which breaks training there, so the whole
    assignment is re-drawn until every client has at least `min_size` examples; after
    MAX_DIRICHLET_DRAWS failures a ValueError says to raise alpha or lower num_clients/min_size.
    """
    _check_client_count(examples, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if any(example.label < 0 for example in examples):
        raise ValueError("Dirichlet label skew needs labelled examples; generation tasks (label -1) use iid")
    if min_size * num_clients > len(examples):
        raise ValueError(f"{num_clients} clients x min_size {min_size} exceeds {len(examples)} examples")
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        by_label[example.label].append(index)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        assignment = _draw_assignment(by_label, num_clients, alpha, rng)
        if min(len(indices) for indices in assignment) >= min_size:
            # Shuffle within each client so its examples are not grouped by label during training.
            return [[examples[i] for i in rng.permutation(indices)] for indices in assignment]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_DRAWS} tries gave all {num_clients} clients "
        f"at least {min_size} examples: use a larger alpha, fewer clients or a smaller min_size"
    )


def _draw_assignment(
    by_label: dict[int, list[int]], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """One draw: per label (in sorted order, for determinism), shuffle its indices and cut by proportions."""
    assignment: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(by_label):
        indices = rng.permutation(by_label[label])
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
        for client, share in enumerate(np.split(indices, cuts)):
            assignment[client].extend(int(i) for i in share)
    return assignment


def partition(
    examples: Sequence[Example],
    num_clients: int,
    scheme: PartitionScheme | str,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[Example]]:
    """Dispatch on the scheme name (as given in configs); alpha is only used by Dirichlet."""
    match PartitionScheme(scheme):
        case PartitionScheme.IID:
            return partition_iid(examples, num_clients, seed)
        case PartitionScheme.DIRICHLET:
            return partition_dirichlet(examples, num_clients, alpha, seed)


def label_histogram(examples: Sequence[Example], num_labels: int) -> list[int]:
    """How many examples carry each label (for reporting how skewed a client's share is)."""
    counts = [0] * num_labels
    for example in examples:
        if not 0 <= example.label < num_labels:
            raise ValueError(f"label {example.label} is outside 0..{num_labels - 1}")
        counts[example.label] += 1
    return counts
