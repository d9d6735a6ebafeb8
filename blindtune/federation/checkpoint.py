"""Per-round server checkpoints: the global adapter (safetensors) and its metadata (JSON), written
atomically so a crash mid-write never leaves a checkpoint that looks complete.

Each checkpoint's metadata carries the hash of the run config that made it (`config_hash`), so a
resume can refuse a checkpoint another configuration wrote."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_STATE = "adapter.safetensors"
_META = "meta.json"
CONFIG_HASH = "config_hash"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or was written by another configuration."""


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


def load_checkpoint(
    root: Path, round_number: int, config_hash: str | None = None
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Round `round_number`'s checkpoint: (round, adapter state, metadata).

    With `config_hash`, a checkpoint that carries another config's hash raises CheckpointError; so does
    one whose files are damaged (truncated by a full disk, say)."""
    directory = root / f"round-{round_number:04d}"
    try:
        meta = json.loads((directory / _META).read_text())
        last_round = int(meta["round"])
        state = load_file(directory / _STATE)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise CheckpointError(
            f"{directory} is damaged ({type(error).__name__}: {error}); delete that folder to resume from the "
            "round before, or start again with --overwrite"
        ) from None
    if config_hash is not None and meta.get(CONFIG_HASH, config_hash) != config_hash:
        raise CheckpointError(
            f"{directory} was written by another config (hash {meta[CONFIG_HASH]}, not {config_hash})"
        )
    return last_round, state, meta


def latest_checkpoint(
    root: Path, config_hash: str | None = None
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last complete checkpoint under `root` (checked as `load_checkpoint` does), or None."""
    rounds = complete_rounds(root)
    return load_checkpoint(root, rounds[-1], config_hash) if rounds else None
