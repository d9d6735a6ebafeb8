import math

import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from blindtune.privacy.config import ServerDPConfig
from blindtune.privacy.server_dp import ServerSideDP

GLOBAL = {"a": torch.zeros(4), "b": torch.ones(2), "frozen": torch.full((2,), 7.0)}


class Nodes:
    def get_node_ids(self):
        return [1, 2, 3]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, 0, SUPERLINK_NODE_ID


def updates(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        node: {"a": torch.randn(4, generator=generator), "b": torch.randn(2, generator=generator)} for node in (1, 2, 3)
    }


def update_norm(state):
    return math.sqrt(sum(float((state[k] - GLOBAL[k]).pow(2).sum()) for k in ("a", "b")))


def test_without_noise_or_clipping_it_is_the_uniform_mean_and_leaves_other_entries():
    dp = ServerSideDP(ServerDPConfig(enabled=True, noise_multiplier=0.0, clipping_norm=1e6))
    out = dp.aggregate(1, updates(), GLOBAL, ["a", "b"], Nodes())
    for name in ("a", "b"):
        torch.testing.assert_close(out[name], sum(state[name] for state in updates().values()) / 3)
    assert torch.equal(out["frozen"], GLOBAL["frozen"])
    assert dp.summary()["epsilon"] is None  # no noise: no finite epsilon


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_clipping_bounds_the_update_and_epsilon_grows_with_rounds(clipping):
    config = ServerDPConfig(
        enabled=True, clipping=clipping, noise_multiplier=1.0, clipping_norm=0.05, clipped_count_stddev=1.0
    )
    dp = ServerSideDP(config)
    quiet = ServerSideDP(ServerDPConfig(enabled=True, noise_multiplier=0.0, clipping_norm=0.05))
    assert update_norm(quiet.aggregate(1, updates(), GLOBAL, ["a", "b"], Nodes())) <= 0.05 + 1e-6
    epsilons = []
    for round_number in (1, 2, 3):
        dp.aggregate(round_number, updates(round_number), GLOBAL, ["a", "b"], Nodes())
        epsilons.append(dp.epsilon())
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert len(dp.summary()["clipping_norms"]) == 3
    louder = ServerSideDP(ServerDPConfig(enabled=True, noise_multiplier=2.0, clipping_norm=0.05))
    louder.rounds = 3
    assert louder.epsilon() < epsilons[-1]
