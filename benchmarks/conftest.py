"""Shared fixture of the benchmark tests: a finished tiny offsite run to re-score."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blindtune.config import RunConfig
from blindtune.methods import run_config_from_dict
from blindtune.models import tiny_model
from blindtune.runner import run_experiment

FinishedRun = tuple[RunConfig, Path, dict[str, Any]]


@pytest.fixture
def finished_offsite_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, Any]], FinishedRun]:
    """Runs offsite tuning on a tiny random model (2 clients, 1 round of 2 steps, 12 test examples) with
    the given `offsite` section; returns its config, folder and results."""
    loaded = tiny_model(num_layers=4, hidden_size=32)
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))

    def run(offsite: dict[str, Any]) -> FinishedRun:
        config = run_config_from_dict(
            {
                "method": "offsite",
                "model": str(tmp_path / "model"),
                "federation": {"num_clients": 2, "rounds": 1, "engine": "inprocess"},
                "train": {"steps": 2, "batch_size": 4, "max_length": 64, "learning_rate": 0.05},
                "eval": {"limit": 12, "batch_size": 8},
                "baselines": {"centralized": False, "local_only": False},
                "offsite": offsite,
            }
        )
        results = run_experiment(config, tmp_path / "run", progress=False)
        return config, tmp_path / "run", results

    return run
