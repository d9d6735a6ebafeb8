"""Server-side messaging: send one message per client, collect replies, set failures aside.

A client that crashes (error reply) or does not answer in time is dropped from the round and
recorded; the round only proceeds when at least `min_replies` clients answered, so a run never
silently continues on too few (or garbage) updates. Content validation (NaN, absurd norms) is the
aggregator's job, which sees the tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from blindtune.federation.ledger import Direction, Ledger
from blindtune.federation.records import MessageKind

log = logging.getLogger(__name__)


class TooFewClientsError(RuntimeError):
    """Fewer clients than required answered a round."""


_PULL_SECONDS = 0.1


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """`Grid.send_and_receive`: the replies that came before `timeout` (None: all of them)."""
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        received = list(grid.pull_messages(waiting))
        replies.extend(received)
        waiting -= {reply.metadata.reply_to_message_id for reply in received}
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(_PULL_SECONDS)
    return replies


@dataclass
class Failure:
    round: int
    node_id: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"round": self.round, "node_id": self.node_id, "reason": self.reason}


@dataclass
class Exchange:
    """Message traffic of one server for one run: ledger plus failures."""

    grid: Grid
    ledger: Ledger = field(default_factory=Ledger)
    failures: list[Failure] = field(default_factory=list)
    timeout_seconds: float | None = None

    def node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def send(
        self,
        kind: MessageKind,
        content_for: Callable[[int], RecordDict],
        node_ids: list[int],
        round_number: int,
        min_replies: int,
    ) -> dict[int, RecordDict]:
        """Send `content_for(node)` to each node; return {node: reply content} of the successful ones."""
        messages = []
        for node_id in node_ids:
            content = content_for(node_id)
            self.ledger.record(Direction.TO_CLIENTS, content, round_number)
            messages.append(Message(content, node_id, str(kind), group_id=str(round_number)))
        replies: dict[int, RecordDict] = {}
        for reply in _send_and_receive(self.grid, messages, self.timeout_seconds):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self.fail(round_number, node_id, f"client error: {reply.error.reason}")
                continue
            self.ledger.record(Direction.TO_SERVER, reply.content, round_number)
            replies[node_id] = reply.content
        for node_id in set(node_ids) - set(replies) - {f.node_id for f in self.failures if f.round == round_number}:
            self.fail(round_number, node_id, "no reply before the timeout")
        if len(replies) < min_replies:
            raise TooFewClientsError(
                f"round {round_number}: {len(replies)} of {len(node_ids)} clients replied, "
                f"{min_replies} required; failures: {[f.reason for f in self.failures if f.round == round_number]}"
            )
        return replies

    def fail(self, round_number: int, node_id: int, reason: str) -> None:
        log.warning("round %d: dropping node %d: %s", round_number, node_id, reason)
        self.failures.append(Failure(round_number, node_id, reason))
