"""Each party's privacy policy, in force while the party handles a message.

The apps (`blindtune.federation.apps`) are each party's own infrastructure: the client app opens a
`client_privacy` scope around every message it passes to a method, and the server app a
`server_privacy` scope around the method's server side. The shared round code
(`blindtune.federation.adapter_rounds`) reads the policy from there, so no method has to thread it
through, and while a client's policy demands DP-SGD, plain `blindtune.training.train` refuses to run:
a method whose client bypasses the DP trainer fails loudly instead of training without DP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blindtune.privacy.config import PrivacyConfig
from blindtune.training.loop import private_training_required


class PrivacyNotAppliedError(RuntimeError):
    """A privacy protection was configured but the method's code path did not apply it."""


@dataclass
class ClientPrivacy:
    """A client's policy: its config, where it keeps its accountant, and how many rounds are planned."""

    config: PrivacyConfig
    workdir: Path
    planned_rounds: int


@dataclass
class ServerPrivacy:
    """The server's policy; the round loop that honours it sets `applied` and fills `report`."""

    config: PrivacyConfig
    applied: bool = False
    report: dict[str, Any] = field(default_factory=dict)


_client: ContextVar[ClientPrivacy | None] = ContextVar("blindtune_client_privacy", default=None)
_server: ContextVar[ServerPrivacy | None] = ContextVar("blindtune_server_privacy", default=None)


@contextmanager
def client_privacy(config: PrivacyConfig, workdir: Path, planned_rounds: int) -> Iterator[ClientPrivacy]:
    policy = ClientPrivacy(config, workdir, planned_rounds)
    token = _client.set(policy)
    guard = (
        private_training_required.set("this client's privacy policy requires DP-SGD (privacy.dp.enabled)")
        if config.dp.enabled
        else None
    )
    try:
        yield policy
    finally:
        if guard is not None:
            private_training_required.reset(guard)
        _client.reset(token)


@contextmanager
def server_privacy(config: PrivacyConfig) -> Iterator[ServerPrivacy]:
    """The server's policy; on a clean exit, a server-side protection nobody applied is an error."""
    policy = ServerPrivacy(config)
    token = _server.set(policy)
    try:
        yield policy
    finally:
        _server.reset(token)
    if config.server_side and not policy.applied:
        raise PrivacyNotAppliedError(
            "privacy.secagg / privacy.server_dp is enabled but this method's server does not aggregate through "
            "blindtune.federation.adapter_rounds.run_rounds, which applies them"
        )


def active_client_privacy() -> ClientPrivacy | None:
    return _client.get()


def active_server_privacy() -> ServerPrivacy | None:
    return _server.get()


def require_client_dp(
    policy: ServerPrivacy | None, metrics: Mapping[int, Mapping[str, Any] | None], round_number: int
) -> float | None:
    """With client DP configured, every used reply's `metrics` must carry its accountant's epsilon: a
    client that trained without DP (a method whose client path bypasses it) stops the run. Returns the
    round's largest epsilon (None when client DP is off; inf when a client reports no noise)."""
    if policy is None or not policy.config.dp.enabled:
        return None
    values = []
    for node, reported in metrics.items():
        value = None if reported is None else reported.get("dp_epsilon")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise PrivacyNotAppliedError(
                f"round {round_number}: client {node} replied without a DP accountant figure although "
                "privacy.dp is enabled: its update may not be differentially private"
            )
        values.append(math.inf if value < 0 else float(value))
    return max(values) if values else None
