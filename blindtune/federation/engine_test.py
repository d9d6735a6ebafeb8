"""How the simulation engine lays virtual clients out on the machine's cores."""

import pytest

from blindtune.federation import engine


@pytest.mark.parametrize(
    ("cores", "clients", "per_client", "total"),
    [
        (2, 3, 1, 3),  # all three at once, sharing the two cores (not two, then one beside an idle core)
        (2, 2, 1, 2),
        (2, 10, 1, 4),  # at most two running clients per core: each holds a model copy
        (16, 3, 5, 16),  # a big machine: all at once, several threads each
    ],
)
def test_every_client_runs_at_once_on_its_share_of_the_cores(monkeypatch, cores, clients, per_client, total):
    monkeypatch.setattr(engine.os, "cpu_count", lambda: cores)
    nodes = engine.simulated_nodes(clients, gpu=False)
    assert (nodes.cpus, nodes.total_cpus) == (per_client, total)
