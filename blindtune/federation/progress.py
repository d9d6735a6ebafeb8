"""One console line per finished round: clients that answered, loss, time so far and time to go.

The lines go to the `blindtune.progress` logger, which the command line shows at any verbosity."""

from __future__ import annotations

import logging
import time

PROGRESS_LOGGER = "blindtune.progress"

log = logging.getLogger(PROGRESS_LOGGER)


def duration(seconds: float) -> str:
    """`75.2` -> `1m15s`; `4000` -> `1h06m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RoundProgress:
    """Times the rounds from `first_round` to `last_round`; the ETA assumes the rest take as long on average."""

    def __init__(self, first_round: int, last_round: int) -> None:
        self.first_round = first_round
        self.last_round = last_round
        self.started = time.monotonic()

    def line(self, round_number: int, clients_done: int, clients_total: int, loss: float | None) -> str:
        elapsed = time.monotonic() - self.started
        rounds_done = round_number - self.first_round + 1
        eta = elapsed / rounds_done * (self.last_round - round_number)
        return (
            f"round {round_number}/{self.last_round}: {clients_done}/{clients_total} clients, "
            # Under DP-SGD clients send no exact loss (it is a per-client value the accountant does not cover).
            f"{'loss not sent (DP)' if loss is None else f'loss {loss:.4f}'}, "
            f"elapsed {duration(elapsed)}, ETA {duration(eta)}"
        )

    def round_done(self, round_number: int, clients_done: int, clients_total: int, loss: float | None) -> None:
        log.info("%s", self.line(round_number, clients_done, clients_total, loss))
