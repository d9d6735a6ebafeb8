"""Each party's privacy policy, in force while the party handles a message.

The apps (`blindtune.federation.apps`) are each party's own infrastructure: the client app opens a
`client_privacy` scope around every message it passes to a method, and the server app a
`server_privacy` scope around the method's server side. The shared round code
(`blindtune.federation.adapter_rounds`) reads the policy from there, so no method has to thread it
through, and while a client's policy demands DP-SGD, plain `blindtune.training.train` refuses to run:
a method whose client bypasses the DP trainer fails loudly instead of training without DP.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

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
    """The server's policy; `applied` is set by the round loop that honoured it."""

    config: PrivacyConfig
    applied: bool = False


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
