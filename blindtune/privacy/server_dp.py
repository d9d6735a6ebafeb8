"""Client-level DP on the server: Flower's DP strategy wrappers around a uniform FedAvg.

Each round, Flower's `DifferentialPrivacyServerSideFixedClipping` (or `...AdaptiveClipping`) clips
every client's update (its adapter minus the global adapter) to the clipping norm, has the wrapped
Flower `FedAvg` average them with equal weights (the sensitivity analysis needs equal weights), and
adds Gaussian noise of standard deviation noise_multiplier * clipping_norm / clients to the mean.
Every client takes part in every round, so each round is one Gaussian mechanism without sampling
amplification; Opacus' RDP accountant composes them into the client-level epsilon reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from blindtune.models.adapters import AdapterState
from blindtune.privacy.accountant import epsilon
from blindtune.privacy.config import AccountantKind, ClippingKind, ServerDPConfig

_WEIGHT = "dp-uniform-weight"
_ARRAYS = "arrays"


def _record(state: AdapterState, names: list[str]) -> ArrayRecord:
    return ArrayRecord({name: Array(state[name].detach().to("cpu").float().numpy()) for name in names})


class ServerSideDP:
    """Aggregates one round at a time with Flower's server-side DP wrapper; keeps the accounting."""

    def __init__(self, config: ServerDPConfig, rounds_done: int = 0) -> None:
        """`rounds_done`: rounds already released under this config (a resumed run accounts for them)."""
        self.config = config
        self.clipping_norm = config.clipping_norm
        self.rounds = rounds_done
        self.clipping_norms: list[float] = []

    def _wrapper(self, num_clients: int) -> Any:
        inner = FedAvg(
            fraction_train=1.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
            weighted_by_key=_WEIGHT,
            arrayrecord_key=_ARRAYS,
        )
        if self.config.clipping is ClippingKind.ADAPTIVE:
            return DifferentialPrivacyServerSideAdaptiveClipping(
                inner,
                noise_multiplier=self.config.noise_multiplier,
                num_sampled_clients=num_clients,
                initial_clipping_norm=self.clipping_norm,
                target_clipped_quantile=self.config.target_clipped_quantile,
                clip_norm_lr=self.config.clip_norm_lr,
                clipped_count_stddev=self.config.clipped_count_stddev,
            )
        return DifferentialPrivacyServerSideFixedClipping(
            inner,
            noise_multiplier=self.config.noise_multiplier,
            clipping_norm=self.clipping_norm,
            num_sampled_clients=num_clients,
        )

    def aggregate(
        self,
        round_number: int,
        states: Mapping[int, AdapterState],
        global_state: AdapterState,
        names: list[str],
        grid: Grid,
    ) -> AdapterState:
        """The noisy mean of the clipped updates of `names` of each node's `states`; other entries keep
        their global value."""
        # A fresh wrapper per round, sized to the clients actually averaged (a dropped client must not
        # shrink the noise below what the sensitivity needs); adaptive clipping carries its norm over.
        wrapper = self._wrapper(len(states))
        self.clipping_norms.append(self.clipping_norm)
        wrapper.configure_train(round_number, _record(global_state, names), ConfigRecord(), grid)
        replies = [
            Message(
                RecordDict({_ARRAYS: _record(state, names), "metrics": MetricRecord({_WEIGHT: 1})}),
                dst_node_id=node_id,
                message_type=MessageType.TRAIN,
            )
            for node_id, state in states.items()
        ]
        arrays, _ = wrapper.aggregate_train(round_number, replies)
        if arrays is None:
            raise RuntimeError(f"round {round_number}: Flower's DP wrapper refused to aggregate")
        self.clipping_norm = float(wrapper.clipping_norm)
        self.rounds += 1
        mean = {
            name: torch.from_numpy(np.asarray(array, dtype=np.float32)).to(global_state[name].dtype)
            for name, array in zip(names, arrays.to_numpy_ndarrays(), strict=True)
        }
        return {**global_state, **mean}

    def epsilon(self) -> float:
        """Client-level epsilon after the rounds so far (full participation: sample rate 1)."""
        return epsilon(AccountantKind.RDP, [(self.config.noise_multiplier, 1.0, self.rounds)], self.config.delta)

    def summary(self) -> dict[str, Any]:
        spent = self.epsilon()
        return {
            "enabled": True,
            "mechanism": f"Flower DifferentialPrivacyServerSide{self.config.clipping.value.capitalize()}Clipping",
            "clipping": self.config.clipping.value,
            "noise_multiplier": self.config.noise_multiplier,
            "clipping_norms": self.clipping_norms,
            "rounds": self.rounds,
            "epsilon": spent if math.isfinite(spent) else None,
            "delta": self.config.delta,
        }
