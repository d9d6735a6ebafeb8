"""Helpers shared by the benchmark parts: device choice, machine description, round timing."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Flower message types of blindtune's apps (blindtune.federation.records.MessageKind), as strings.
SETUP, TRAIN = "query.setup", "train"


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given, else the first CUDA GPU when one is present, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict[str, Any]:
    """What the figures were measured on (the load average says how contended the CPUs were)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ---- per-round timing of the federation layer -------------------------------------------------


@dataclass
class ExchangeTimings:
    """Wall time of each `Exchange.send` the server made: (kind, round, seconds, replies)."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def rounds(self) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["kind"] == TRAIN]


@contextlib.contextmanager
def timed_exchanges() -> Iterator[ExchangeTimings]:
    """Time every message exchange of the runs inside the block (server side, any engine).

    Wraps `blindtune.federation.rounds.Exchange.send` for the duration only: the send/collect of a
    round is the federation layer plus the clients' work, so `round wall - client train seconds` is
    what the federation layer (messages, serialisation, client rebuild from its workdir) costs.
    """
    from blindtune.federation.rounds import Exchange

    timings = ExchangeTimings()
    original = Exchange.send

    def send(self: Exchange, kind: Any, content_for: Any, node_ids: Any, round_number: int, min_replies: int) -> Any:
        started = time.perf_counter()
        replies = original(self, kind, content_for, node_ids, round_number, min_replies)
        timings.calls.append(
            {
                "kind": str(kind),
                "round": round_number,
                "seconds": time.perf_counter() - started,
                "nodes": len(node_ids),
                "replies": len(replies),
            }
        )
        return replies

    Exchange.send = send  # type: ignore[method-assign]
    try:
        yield timings
    finally:
        Exchange.send = original  # type: ignore[method-assign]


def federation_overhead(timings: ExchangeTimings, clients: list[dict[str, Any]], parallelism: int = 1) -> dict:
    """Per round: wall time of the train exchange, the clients' training time, and the difference.

    `clients` are results.json `clients` rows (round, train_seconds). With `parallelism` clients
    training at once, client compute on the round's critical path is sum(train_seconds) / parallelism.
    """
    rows = []
    for call in timings.rounds():
        train = [float(c.get("train_seconds", 0.0)) for c in clients if c.get("round") == call["round"]]
        compute = sum(train) / max(1, min(parallelism, len(train) or 1))
        rows.append(
            {
                "round": call["round"],
                "round_seconds": call["seconds"],
                "client_train_seconds": compute,
                "overhead_seconds": call["seconds"] - compute,
            }
        )
    setup = [c["seconds"] for c in timings.calls if c["kind"] == SETUP]
    mean = sum(r["overhead_seconds"] for r in rows) / len(rows) if rows else None
    return {"rounds": rows, "mean_overhead_seconds": mean, "setup_seconds": sum(setup) if setup else None}


# ---- memory ------------------------------------------------------------------------------------


class TreeMemorySampler:
    """Peak resident memory of a process and all its descendants (Ray workers too), sampled."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        try:
            processes = [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            return 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
