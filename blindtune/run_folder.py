"""The run folder (`--out`): checked before any work starts, never mixed between two runs.

A fresh run refuses a folder that holds another run's results or checkpoints (`--resume` continues
that run, `--overwrite` clears it first); a resume refuses a folder whose config or checkpoints were
made by other settings, and names the settings that differ.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from blindtune.config import RunConfig, config_differences
from blindtune.federation.checkpoint import CONFIG_HASH, CheckpointError, latest_checkpoint
from blindtune.methods import run_config_from_dict

CONFIG = "config.json"
# What a run writes into its folder; `--overwrite` removes exactly these.
RUN_OUTPUTS = (
    "results.json",
    "report.md",
    "federation.json",
    CONFIG,
    "checkpoints",
    "label_only",
    "clients",
    "logs",
    "accuracy_per_round.png",
    "bytes_per_method.png",
)
# The outputs that mean "another run's work is here".
_STALE = ("results.json", "federation.json", "checkpoints", "label_only")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run; the message says why and what to do."""


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"--out {out_dir} is a file, not a folder")
    existing = out_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"--out {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out_dir}: {existing} is not writable")


def clear_run_folder(out_dir: Path) -> list[str]:
    """Remove a previous run's outputs from `out_dir` (nothing else); return the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def prepare_run_folder(out_dir: Path, config: RunConfig, resume: bool) -> None:
    """Check `out_dir` for a fresh run or a resume of `config`, then write its config.json."""
    check_out_dir(out_dir)
    if resume:
        _check_resumable(out_dir, config)
    else:
        stale = [name for name in _STALE if (out_dir / name).exists()]
        if stale:
            raise RunFolderError(
                f"{out_dir} holds another run's {', '.join(stale)}: continue that run with --resume, "
                "start clean with --overwrite, or choose another --out"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG).write_text(json.dumps(config.to_dict(), indent=2))


def _check_resumable(out_dir: Path, config: RunConfig) -> None:
    config_file = out_dir / CONFIG
    if not config_file.is_file():
        raise RunFolderError(f"nothing to resume in {out_dir}: no {CONFIG}")
    try:
        # Read back through the config classes: a field added since (with its default) is no difference.
        previous = run_config_from_dict(json.loads(config_file.read_text())).to_dict()
    except ValueError as error:
        raise RunFolderError(f"{config_file} is not a run config ({error}); start again with --overwrite") from None
    differences = config_differences(previous, config.to_dict())
    if differences:
        raise RunFolderError(
            f"cannot resume {out_dir} with other settings ({'; '.join(differences)}): use the config that run used, "
            "or start clean with --overwrite"
        )
    expected = config.content_hash()
    for checkpoints in sorted(out_dir.glob("**/checkpoints")):
        try:
            latest = latest_checkpoint(checkpoints)
        except CheckpointError as error:
            raise RunFolderError(str(error)) from None
        if latest is None or latest[2].get(CONFIG_HASH) in (None, expected):
            continue
        _, _, meta = latest
        raise RunFolderError(
            f"{checkpoints} was written by another config (hash {meta[CONFIG_HASH]}, this config {expected}): "
            "start clean with --overwrite or choose another --out"
        )


def last_complete_round(out_dir: Path) -> int | None:
    """The round of the newest checkpoint in `out_dir/checkpoints` (None: no round finished)."""
    rounds = sorted((out_dir / "checkpoints").glob("round-*/meta.json"))
    return int(rounds[-1].parent.name.removeprefix("round-")) if rounds else None
