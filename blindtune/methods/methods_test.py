"""Every registered method, end to end on a tiny model through the in-process Flower grid."""

import json
from typing import Any

import pytest

from blindtune.conftest import tiny_run_config
from blindtune.methods import method_names
from blindtune.runner import run_experiment

# Server-side preparation budgets small enough for a tiny model in seconds.
SHORT = {"steps": 2, "batch_size": 4, "max_length": 16}
TINY_METHOD_SECTIONS: dict[str, dict[str, Any]] = {
    "lleot": {"lleot": {"distill": SHORT, "elevation": SHORT}},
    "fedproxy": {"fedproxy": {"compression": {"distill": SHORT, "importance_texts": 8}}},
    "fedcot": {"fedcot": {"prompts_per_client": 6, "max_new_tokens": 6, "privatisation": {"attack_top_k": 3}}},
    "fedmkt": {
        "fedmkt": {"public_limit": 8, "top_k": 8, "server_steps": 2, "client_distill_steps": 2, "slm_fedavg": True}
    },
}


@pytest.mark.parametrize("method", method_names())
def test_method_runs_end_to_end_on_a_tiny_model(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    config = tiny_run_config(method, tiny_model_dir, TINY_METHOD_SECTIONS.get(method))
    results = run_experiment(config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["method"] == method and saved["num_clients"] == 2 and saved["rounds"] == 2
    for key in ("llm_zero_shot", "emulator_zero_shot", "plugin", "centralized", "local_only"):
        assert 0.0 <= results["metrics"][key] <= 1.0, key
    assert [row["round"] for row in results["history"]] == [1, 2]
    cost = results["cost"]
    assert cost["bytes_to_clients"] > cost["bytes_to_server"] > 0
    assert cost["wall_seconds"] > 0 and cost["train_tokens_per_second"] > 0
    assert results["failures"] == []
    if method == "fedmkt":  # the LLM on the public set alone, same server schedule: the federation's baseline
        assert 0.0 <= results["metrics"]["llm_public_only"] <= 1.0
        gain = results["metrics"]["plugin"] - results["metrics"]["llm_public_only"]
        assert results["metrics"]["federation_gain"] == pytest.approx(gain)
    assert (tmp_path / "run" / "report.md").is_file()
    assert (tmp_path / "run" / "checkpoints" / "round-0002" / "adapter.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.ci
def test_flower_simulation_engine_runs_the_same_apps(tiny_model_dir, tmp_path):
    config = tiny_run_config(
        "offsite",
        tiny_model_dir,
        {"federation": {"engine": "simulation"}, "baselines": {"centralized": False, "local_only": False}},
    )
    results = run_experiment(config, tmp_path, progress=False)
    assert [row["round"] for row in results["history"]] == [1, 2]
    assert len({row["node_id"] for row in results["clients"]}) == 2
    assert results["failures"] == [] and 0.0 <= results["metrics"]["plugin"] <= 1.0


# Methods whose clients train through the shared DP-SGD path with the default adapter; every other one must
# refuse DP, not ignore it (LLEOT's default soft prompt is a module Opacus has no per-example gradient for).
DP_METHODS = {"offsite", "fedproxy"}


@pytest.mark.parametrize("method", method_names())
def test_dp_runs_with_its_epsilon_or_is_refused(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    overrides = {
        **TINY_METHOD_SECTIONS.get(method, {}),
        "baselines": {"centralized": False, "local_only": False},
        "privacy": {
            "dp": {"enabled": True, "noise_multiplier": 1.0},
            "audit": {"membership_inference": method in DP_METHODS, "mia_examples": 8},
        },
    }
    config = tiny_run_config(method, tiny_model_dir, overrides)
    if method not in DP_METHODS:
        with pytest.raises(Exception, match=r"DP-SGD|plain training refused|not supported"):
            results = run_experiment(config, tmp_path / "run", progress=False)
            assert results["failures"] == [], results["failures"]  # a run that survived without DP fails here
        return
    results = run_experiment(config, tmp_path / "run", progress=False)
    dp = results["privacy"]["dp"]
    assert dp["enabled"] and 0 < dp["epsilon"] < float("inf")
    assert list(dp["epsilon_by_round"]) == ["1", "2"] and dp["epsilon_by_round"]["1"] < dp["epsilon_by_round"]["2"]
    assert results["failures"] == []
    # the audit plugs the final adapter into the LLM the method's way (FedProxy's fits only its proxy)
    assert 0.0 <= results["privacy"]["membership_inference"]["loss"]["auc"] <= 1.0
