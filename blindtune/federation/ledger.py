"""The communication ledger: every message that crosses a party boundary, by direction and kind."""

from __future__ import annotations

import enum
from collections import defaultdict
from dataclasses import dataclass, field

from flwr.app import RecordDict

from blindtune.federation.records import record_bytes


class Direction(enum.StrEnum):
    TO_CLIENTS = "to_clients"
    TO_SERVER = "to_server"


@dataclass
class Ledger:
    """Bytes and message counts per (direction, record kind), totals and per round."""

    bytes_by_kind: dict[Direction, dict[str, int]] = field(
        default_factory=lambda: {d: defaultdict(int) for d in Direction}
    )
    messages: dict[Direction, int] = field(default_factory=lambda: dict.fromkeys(Direction, 0))
    bytes_by_round: dict[int, dict[Direction, int]] = field(default_factory=dict)

    def record(self, direction: Direction, content: RecordDict, round_number: int) -> None:
        sizes = record_bytes(content)
        for kind, size in sizes.items():
            self.bytes_by_kind[direction][kind] += size
        self.messages[direction] += 1
        per_round = self.bytes_by_round.setdefault(round_number, dict.fromkeys(Direction, 0))
        per_round[direction] += sum(sizes.values())

    def total(self, direction: Direction) -> int:
        return sum(self.bytes_by_kind[direction].values())

    def to_dict(self) -> dict[str, object]:
        return {
            "bytes_to_clients": self.total(Direction.TO_CLIENTS),
            "bytes_to_server": self.total(Direction.TO_SERVER),
            "bytes_by_kind": {d.value: dict(kinds) for d, kinds in self.bytes_by_kind.items()},
            "messages": {d.value: n for d, n in self.messages.items()},
        }
