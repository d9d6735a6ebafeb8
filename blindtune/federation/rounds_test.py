"""Exchange waits for replies until they come, the timeout passes, or the user interrupts the run."""

import pytest
from flwr.app import RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from blindtune.federation import rounds
from blindtune.federation.records import MessageKind
from blindtune.federation.rounds import Exchange, TooFewClientsError


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity, which its engines set (as does ours)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, 0, SUPERLINK_NODE_ID


class SilentGrid:
    """Two nodes that accept messages and never answer."""

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        return [f"id-{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids):
        return []


def send(exchange: Exchange, min_replies: int = 1) -> dict:
    return exchange.send(MessageKind.TRAIN, lambda node: RecordDict(), [1, 2], 1, min_replies)


def test_clients_that_do_not_answer_in_time_are_dropped(monkeypatch):
    monkeypatch.setattr(rounds, "_PULL_SECONDS", 0.0)
    exchange = Exchange(SilentGrid(), timeout_seconds=0.0)  # type: ignore[arg-type]
    with pytest.raises(TooFewClientsError, match="0 of 2 clients replied"):
        send(exchange)
    assert [f.reason for f in exchange.failures] == ["no reply before the timeout"] * 2
