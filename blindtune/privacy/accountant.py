"""Privacy accounting with Opacus' accountants, kept across rounds in a party's work directory.

An accountant's state is its history of (noise multiplier, sample rate, steps) entries; composition
over any number of them is what `get_epsilon` computes. A client stores the history in
`privacy_accountant.json` next to its artefact and appends each round's steps, so the epsilon it
reports after round r covers rounds 1..r. The file is reset when the server's setup message starts a
new run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blindtune.privacy.config import AccountantKind

ACCOUNTANT_FILE = "privacy_accountant.json"

HistoryEntry = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class OpacusMissingError(ImportError):
    """Differential privacy was requested but Opacus is not installed."""


def _opacus_accountants() -> Any:
    try:
        from opacus import accountants
    except ImportError as error:  # pragma: no cover - opacus is installed where DP is used
        raise OpacusMissingError("differential privacy needs Opacus: pip install 'opacus>=1.5'") from error
    return accountants


def new_accountant(kind: AccountantKind, history: list[HistoryEntry] | None = None) -> Any:
    """An Opacus accountant (`rdp` or `prv`) holding `history`."""
    accountant = _opacus_accountants().create_accountant(mechanism=str(kind))
    accountant.history = [tuple(entry) for entry in history or []]
    return accountant


def epsilon(kind: AccountantKind, history: list[HistoryEntry], delta: float) -> float:
    """Epsilon spent by `history` at `delta` (0 for no steps, inf when a step had no noise)."""
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0
    if any(noise <= 0 for noise, _, steps in history if steps > 0):
        return math.inf
    return float(new_accountant(kind, history).get_epsilon(delta=delta))


def noise_for_budget(
    kind: AccountantKind, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The smallest noise multiplier whose epsilon after `steps` steps at `sample_rate` is <= the target."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search's large trial noises put the best RDP order at the edge
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=max(1, steps),
                accountant=str(kind),
            )
        )


@dataclass
class AccountantState:
    """What a client keeps between rounds: its accountant's history and the settings it spent under."""

    kind: AccountantKind
    delta: float
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the rounds trained so far

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self) -> float:
        return epsilon(self.kind, self.history, self.delta)

    def to_json(self) -> str:
        return json.dumps(
            {
                "accountant": str(self.kind),
                "delta": self.delta,
                "history": [list(entry) for entry in self.history],
                "rounds": self.rounds,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> AccountantState:
        data = json.loads(text)
        return cls(
            kind=AccountantKind(data["accountant"]),
            delta=float(data["delta"]),
            history=[(float(n), float(q), int(s)) for n, q, s in data["history"]],
            rounds=[int(r) for r in data.get("rounds", [])],
        )


def load_accountant(workdir: Path, kind: AccountantKind, delta: float) -> AccountantState:
    """The client's accountant state, or a fresh one; settings that changed mid-run are an error."""
    path = workdir / ACCOUNTANT_FILE
    if not path.is_file():
        return AccountantState(kind=kind, delta=delta)
    state = AccountantState.from_json(path.read_text())
    if state.kind is not kind or not math.isclose(state.delta, delta, rel_tol=1e-9):
        raise ValueError(
            f"{path} accounts with {state.kind} at delta={state.delta}, this round asks for {kind} at delta={delta}"
        )
    return state


def save_accountant(workdir: Path, state: AccountantState) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=workdir, prefix=f".{ACCOUNTANT_FILE}.")
    with os.fdopen(handle, "w") as file:
        file.write(state.to_json())
    os.replace(temporary, workdir / ACCOUNTANT_FILE)


def reset_accountant(workdir: Path) -> None:
    """Forget the accounting of a previous run (called when a new run's setup message arrives)."""
    (workdir / ACCOUNTANT_FILE).unlink(missing_ok=True)
