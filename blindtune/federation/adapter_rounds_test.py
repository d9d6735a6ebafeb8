"""The server's step on the aggregated adapter."""

import pytest
import torch

from blindtune.config import ConfigError, FederationConfig
from blindtune.federation.adapter_rounds import server_step
from blindtune.federation.strategies import StrategyName


def test_the_server_learning_rate_scales_the_aggregated_update():
    previous = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    aggregated = {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([0.5])}
    assert server_step(previous, aggregated, 1.0) is aggregated  # plain FedAvg: the aggregate as is
    stepped = server_step(previous, aggregated, 3.0)
    assert torch.equal(stepped["a"], torch.tensor([4.0, -1.0])) and torch.equal(stepped["b"], torch.tensor([1.5]))


def test_a_server_learning_rate_is_refused_where_it_means_nothing():
    with pytest.raises(ConfigError, match="server_learning_rate must be > 0"):
        FederationConfig(server_learning_rate=0)
    with pytest.raises(ConfigError, match="flora"):
        FederationConfig(server_learning_rate=2, strategy=StrategyName.FLORA)
