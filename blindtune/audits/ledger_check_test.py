import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from blindtune.audits.ledger_check import TrafficAudit, check, private_fragments
from blindtune.data import Example

TEMPLATE = "Category (one of: animal, plant):"
CLIENTS = [
    [Example(prompt=f"Definition: a small furry animal number {i} that hides\n{TEMPLATE}", target=" animal")]
    for i in range(30)
]


class FakeGrid:
    """Answers every message with a preset reply content."""

    def __init__(self, reply: RecordDict) -> None:
        self.reply = reply

    def send_and_receive(self, messages, *, timeout=None):
        return [Message(self.reply, reply_to=m) for m in messages]


def _audit(reply: RecordDict) -> TrafficAudit:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, 0, SUPERLINK_NODE_ID
    audit = TrafficAudit(FakeGrid(reply))  # type: ignore[arg-type]
    audit.send_and_receive([Message(RecordDict(), dst_node_id=1, message_type="train")])
    return audit


def test_private_fragments_skip_template_lines():
    fragments = private_fragments([e for examples in CLIENTS for e in examples])
    assert "Definition: a small furry animal number 3 that hides" in fragments
    assert "a small furry animal number 3 that hides" in fragments  # without its short label
    assert TEMPLATE not in fragments


def test_numbers_and_binary_pass_and_raw_text_fails():
    clean = RecordDict(
        {
            "adapter": ArrayRecord({"w": torch.zeros(3)}),
            "metrics": MetricRecord({"train_loss": 1.0}),
            "keys": ConfigRecord({"pk": b"\x93\x00\xffbinary", "status": "OK"}),
        }
    )
    verdict = check(_audit(clean), CLIENTS)
    assert verdict["passed"] and verdict["replies_checked"] == 1 and verdict["texts_received"] == 1

    leaky = RecordDict({"notes": ConfigRecord({"text": "it was a small furry animal number 7 that hides, sir"})})
    verdict = check(_audit(leaky), CLIENTS)
    assert not verdict["passed"] and verdict["raw_text_leaks"] == 1
    assert verdict["leak_examples"][0]["record"] == "notes"

    # A paraphrase sharing a long run of words is caught too.
    partial = RecordDict({"notes": ConfigRecord({"text": b"A SMALL FURRY ANIMAL NUMBER 7 THAT whatever"})})
    assert not check(_audit(partial), CLIENTS)["passed"]


def test_privatised_text_is_counted_apart_and_must_not_be_raw():
    privatised = RecordDict({"rationale": ConfigRecord({"text": "some creature, details withheld"})})
    verdict = check(_audit(privatised), CLIENTS, privatised_records=["rationale"])
    assert verdict["passed"] and verdict["privatised_texts_received"] == 1 and verdict["other_texts_received"] == 0
    raw = RecordDict({"rationale": ConfigRecord({"text": "a small furry animal number 2 that hides"})})
    assert not check(_audit(raw), CLIENTS, privatised_records=["rationale"])["passed"]


def test_a_dp_run_fails_when_clients_send_un_noised_per_client_values():
    noised_only = RecordDict({"metrics": MetricRecord({"num_examples": 30, "dp_epsilon": 7.9, "train_seconds": 2.0})})
    assert check(_audit(noised_only), CLIENTS, dp_enabled=True)["passed"]
    exact = RecordDict({"metrics": MetricRecord({"num_examples": 30, "dp_epsilon": 7.9, "train_loss": 1.3})})
    verdict = check(_audit(exact), CLIENTS, dp_enabled=True)
    assert not verdict["passed"] and verdict["unnoised_metrics_under_dp"] == ["metrics/train_loss"]
    assert check(_audit(exact), CLIENTS)["passed"]  # without DP a loss is no privacy claim
