"""Shared fixtures: a tiny random model saved as a Hugging Face directory, and tiny run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from blindtune.config import RunConfig, merge
from blindtune.methods import run_config_from_dict
from blindtune.models import tiny_model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where torch sees a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    loaded = tiny_model(num_layers=8, hidden_size=32)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def tiny_run_config(method: str, model_dir: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A run that takes seconds: 2 clients, 2 rounds of 2 steps, 12 test examples, in-process engine."""
    data = {
        "method": method,
        "model": str(model_dir),
        "task": "wordnet-supersense",
        "federation": {"num_clients": 2, "rounds": 2, "engine": "inprocess"},
        "train": {"steps": 2, "batch_size": 4, "max_length": 64},
        "eval": {"limit": 12, "batch_size": 6},
        "baselines": {"centralized": True, "local_only": True},
    }
    return run_config_from_dict(merge(data, overrides or {}))
