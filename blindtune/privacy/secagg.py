"""Secure aggregation with Flower's SecAgg+ protocol, as the run's `privacy.secagg` configures it.

The server runs Flower's own `SecAggPlusWorkflow` each round and every client Flower's own
`secaggplus_mod`: the server learns only the example-weighted mean of the clients' quantised
adapters. How blindtune's rounds speak the protocol is `blindtune.federation.secagg`.
"""

from __future__ import annotations

from typing import Any

from flwr.clientapp.typing import Mod
from flwr.server.workflow import SecAggPlusWorkflow

from blindtune.privacy.config import SecAggConfig


def workflow(config: SecAggConfig) -> SecAggPlusWorkflow:
    return SecAggPlusWorkflow(
        num_shares=float(config.share_fraction),
        reconstruction_threshold=float(config.threshold_fraction),
        max_weight=config.max_weight,
        clipping_range=config.clipping_range,
        quantization_range=config.quantization_range,
        timeout=config.timeout_seconds,
    )


def secagg_summary(config: SecAggConfig) -> dict[str, Any]:
    """How the run aggregated, for results.json."""
    return {
        "enabled": True,
        "protocol": "SecAgg+ (Flower SecAggPlusWorkflow on the server, secaggplus_mod on the clients)",
        "share_fraction": config.share_fraction,
        "threshold_fraction": config.threshold_fraction,
        "clipping_range": config.clipping_range,
        "quantization_step": 2 * config.clipping_range / config.quantization_range,
        "server_sees": "the example-weighted mean of the client adapters, and each client's metrics",
        "update_screening": "none (individual updates are masked)",
    }


def protocol_mod() -> Mod:
    """The client side of the protocol: Flower's mod answers its stages and masks the client's update."""
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod
