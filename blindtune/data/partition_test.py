import pytest

from blindtune.data.partition import (
    PartitionScheme,
    label_histogram,
    partition,
    partition_dirichlet,
    partition_iid,
)
from blindtune.data.task import Example

CHOICES = tuple(f" c{i}" for i in range(10))


def labelled(count: int, num_labels: int = 10) -> list[Example]:
    return [Example(f"p{i}", CHOICES[i % num_labels], CHOICES, i % num_labels) for i in range(count)]


def prompts(shares: list[list[Example]]) -> list[str]:
    return sorted(example.prompt for share in shares for example in share)


def mean_max_label_share(shares: list[list[Example]]) -> float:
    return sum(max(label_histogram(share, 10)) / len(share) for share in shares) / len(shares)


def test_iid_is_a_deterministic_balanced_disjoint_cover() -> None:
    examples = labelled(103)
    shares = partition_iid(examples, 4, seed=0)
    assert sorted(map(len, shares)) == [25, 26, 26, 26]
    assert prompts(shares) == sorted(e.prompt for e in examples)
    assert partition_iid(examples, 4, seed=0) == shares
    assert partition_iid(examples, 4, seed=1) != shares


def test_dirichlet_is_a_deterministic_disjoint_cover_respecting_min_size() -> None:
    examples = labelled(1000)
    shares = partition_dirichlet(examples, 8, alpha=0.3, seed=0, min_size=20)
    assert len(shares) == 8 and min(map(len, shares)) >= 20
    assert prompts(shares) == sorted(e.prompt for e in examples)
    assert partition_dirichlet(examples, 8, alpha=0.3, seed=0, min_size=20) == shares
    assert partition_dirichlet(examples, 8, alpha=0.3, seed=1, min_size=20) != shares


def test_small_alpha_skews_labels_far_more_than_large_alpha() -> None:
    examples = labelled(2000)
    skewed = mean_max_label_share(partition_dirichlet(examples, 10, alpha=0.1, seed=0))
    even = mean_max_label_share(partition_dirichlet(examples, 10, alpha=100.0, seed=0))
    assert skewed > 0.4 and even < 0.2


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="larger alpha"):
        partition_dirichlet(labelled(40), 20, alpha=0.01, seed=0, min_size=2)


def test_dirichlet_rejects_generation_examples() -> None:
    generation = [Example(f"q{i}", " a", answer="1") for i in range(10)]
    with pytest.raises(ValueError, match="generation"):
        partition(generation, 2, PartitionScheme.DIRICHLET, alpha=1.0, seed=0)
    assert len(partition(generation, 2, "iid", seed=0)) == 2


@pytest.mark.parametrize("num_clients", [0, -1, 11])
def test_client_count_must_fit(num_clients: int) -> None:
    for scheme in PartitionScheme:
        with pytest.raises(ValueError, match="client"):
            partition(labelled(10), num_clients, scheme, alpha=1.0, seed=0)


def test_dispatcher_accepts_scheme_names_and_rejects_unknown_ones() -> None:
    examples = labelled(50)
    assert partition(examples, 3, "dirichlet", alpha=1.0, seed=2) == partition_dirichlet(examples, 3, 1.0, 2)
    with pytest.raises(ValueError):
        partition(examples, 3, "shards", alpha=1.0, seed=0)


def test_label_histogram_counts_and_checks_range() -> None:
    assert label_histogram(labelled(23, num_labels=3), 3) == [8, 8, 7]
    with pytest.raises(ValueError):
        label_histogram(labelled(5), 3)
