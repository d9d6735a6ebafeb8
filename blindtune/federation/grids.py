"""A Grid that forwards everything to another Grid and lets a subclass watch the traffic."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class DelegatingGrid(Grid):
    """Forwards every call to `inner`; `outgoing` sees each message sent, `incoming` each reply."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def outgoing(self, messages: list[Message]) -> list[Message]:
        """Called with the messages about to be sent; returns what is sent instead (the same by default)."""
        return messages

    def incoming(self, replies: list[Message]) -> None:
        """Called with the replies received."""

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Any:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self.outgoing(list(messages)))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self.incoming(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(self.outgoing(list(messages)), timeout=timeout))
        self.incoming(replies)
        return replies
