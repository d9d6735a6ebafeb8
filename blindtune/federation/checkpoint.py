"""Per-round server checkpoints: the global adapter (safetensors) and its metadata (JSON), written
atomically so a crash mid-write never leaves a checkpoint that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STATE = "adapter.safetensors"
_META = "meta.json"


def save_checkpoint(root: Path, round_number: int, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"round-{round_number:04d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    save_file({k: v.contiguous() for k, v in state.items()}, staging / _STATE)
    (staging / _META).write_text(json.dumps({"round": round_number, **meta}, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def complete_rounds(root: Path) -> list[int]:
    """The rounds with a complete checkpoint under `root`, ascending."""
    return sorted(
        int(p.name.split("-")[1]) for p in root.glob("round-*") if (p / _STATE).is_file() and (p / _META).is_file()
    )


def load_checkpoint(root: Path, round_number: int) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Round `round_number`'s checkpoint: (round, adapter state, metadata)."""
    directory = root / f"round-{round_number:04d}"
    meta = json.loads((directory / _META).read_text())
    return int(meta["round"]), load_file(directory / _STATE), meta


def latest_checkpoint(root: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last complete checkpoint under `root`, or None."""
    rounds = complete_rounds(root)
    return load_checkpoint(root, rounds[-1]) if rounds else None
