"""Re-scoring a finished run's plug-in on a tiny model: the same examples give the run's own figure."""

from __future__ import annotations

import pytest

from benchmarks.plugin_eval import markdown, rescore
from blindtune.methods import run_config_from_dict
from blindtune.models import tiny_model
from blindtune.runner import run_experiment


@pytest.mark.parametrize("adapter", [{"kind": "lora", "lora_rank": 2}, {"kind": "soft_prompt", "prompt_length": 2}])
def test_rescoring_the_runs_own_examples_reproduces_its_plugin(adapter, tmp_path, monkeypatch):
    loaded = tiny_model(num_layers=4, hidden_size=32)
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    config = run_config_from_dict(
        {
            "method": "offsite",
            "model": str(tmp_path / "model"),
            "federation": {"num_clients": 2, "rounds": 1, "engine": "inprocess"},
            "train": {"steps": 2, "batch_size": 4, "max_length": 64, "learning_rate": 0.05},
            "eval": {"limit": 12, "batch_size": 8},
            "baselines": {"centralized": False, "local_only": False},
            "offsite": {"adapter_layers_per_side": 1, "middle_keep_every": 2, "adapter": adapter},
        }
    )
    results = run_experiment(config, tmp_path / "run", progress=False)
    row = rescore(tmp_path / "run", limit=12)
    assert row["plugin"] == results["metrics"]["plugin"] == row["run_plugin"]
    assert row["llm_zero_shot"] == results["metrics"]["llm_zero_shot"]
    assert row["examples"] == 12 and 0 <= row["plugin_95"] <= 0.5
    assert "| run |" in markdown([row])
