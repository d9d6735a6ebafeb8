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


def latest_checkpoint(root: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last complete checkpoint under `root`, or None."""
    rounds = sorted(p for p in root.glob("round-*") if (p / _STATE).is_file() and (p / _META).is_file())
    if not rounds:
        return None
    meta = json.loads((rounds[-1] / _META).read_text())
    return int(meta["round"]), load_file(rounds[-1] / _STATE), meta
