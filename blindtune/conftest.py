"""Shared fixtures: a tiny random model saved as a Hugging Face directory, tiny run configs, and the
public text and emulator pairs the emulator tests (distillation, leakage, LLEOT elevation) share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from blindtune.config import RunConfig, merge
from blindtune.methods import run_config_from_dict
from blindtune.models import tiny_model
from blindtune.models.distill import EmulatorPair, PublicTexts, public_texts
from blindtune.models.surgery import build_emulator, plan_layers


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


@pytest.fixture(scope="module")  # per test module: a test may train it in place
def tiny():
    """A 6-layer tiny model: emulators of it keep 1 layer per side and every `keep_every`-th middle one."""
    return tiny_model(num_layers=6, hidden_size=32)


@pytest.fixture(scope="module")
def texts() -> PublicTexts:
    """Public WordNet adverb glosses (never the clients' task)."""
    return public_texts("wordnet:adv", task="wordnet-supersense")


def emulator_pair(llm: PreTrainedModel, keep_every: int) -> EmulatorPair:
    """A 6-layer `llm` and its emulator (1 layer per side intact, every `keep_every`-th middle layer)."""
    plan = plan_layers(6, 1, keep_every)
    return EmulatorPair(llm, build_emulator(llm, plan), plan)
