"""Every registered method, end to end on a tiny model through the in-process Flower grid."""

import json
from typing import Any

import pytest
import torch

from blindtune.audits.audit import final_adapter
from blindtune.conftest import tiny_run_config
from blindtune.federation.rounds import TooFewClientsError
from blindtune.methods import get_method, method_names
from blindtune.models import load_model
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
        correct = results["metrics"][key] * 12  # accuracies on the 12 test examples
        assert correct == pytest.approx(round(correct)) and 0 <= round(correct) <= 12, key
    assert results["metrics"]["plugin"] == results["history"][-1]["plugin"]
    assert [row["round"] for row in results["history"]] == [1, 2]
    cost = results["cost"]
    assert cost["bytes_to_clients"] > cost["bytes_to_server"] > 0
    assert cost["wall_seconds"] > 0 and cost["train_tokens_per_second"] > 0
    assert results["failures"] == []
    if method == "fedmkt":  # the LLM on the public set alone, same server schedule: the federation's baseline
        assert 0.0 <= results["metrics"]["llm_public_only"] <= 1.0
        gain = results["metrics"]["plugin"] - results["metrics"]["llm_public_only"]
        assert results["metrics"]["federation_gain"] == pytest.approx(gain)
    if method in {"offsite", "lleot"}:  # what explains transfer, and what the hand-out alone can do
        assert all({"hand_out", "gradient_cosine"} <= set(row) for row in results["history"])
        on_hand_out = results["metrics"]["plugin_on_hand_out"]
        assert results["metrics"]["transfer_gap"] == pytest.approx(on_hand_out - results["metrics"]["plugin"])
        leakage = results["privacy"]["emulator"]
        assert {"wordnet-supersense", "wordnet-definition"} <= set(leakage["tasks"])
        for scores in leakage["tasks"].values():
            above_chance = scores["llm_zero_shot"] - scores["chance"]
            expected = (scores["emulator_zero_shot"] - scores["chance"]) / above_chance if above_chance > 0 else None
            assert scores["capability_retained"] == pytest.approx(expected)
        assert (
            results["metrics"]["capability_retained"] == leakage["tasks"]["wordnet-supersense"]["capability_retained"]
        )
    assert not any(row["from_cache"] for row in results["reference_rows"].values())
    if method == "offsite":  # the cache is the runner's, the same for every method: one check is enough
        again = run_experiment(config, tmp_path / "again", progress=False)  # same inputs: rows from the cache
        assert all(row["from_cache"] for row in again["reference_rows"].values())
        for key in ("centralized", "local_only"):
            assert again["metrics"][key] == results["metrics"][key]
    assert (tmp_path / "run" / "report.md").is_file()
    assert (tmp_path / "run" / "checkpoints" / "round-0002" / "adapter.safetensors").is_file()

    # The federation trained the adapter: its LoRA B factors (zero when untrained) moved, and the LLM
    # with it plugged in (for the methods that plug one in) computes other logits than the LLM alone.
    state = final_adapter(tmp_path / "run")
    lora_b = [tensor for name, tensor in state.items() if "lora_B" in name]
    assert all(float(tensor.abs().max()) > 0 for tensor in lora_b)
    llm = load_model(config.model)
    plugged = get_method(method).plugged_llm(config, llm, state)
    if plugged is None:
        assert method in {"fedcot", "fedmkt"} and lora_b  # their adapter is the SLM's / the server's own LoRA
        return
    prompt = llm.tokenizer(["Definition: a small dog\nCategory:"], return_tensors="pt")
    with torch.no_grad():
        alone = llm.model(**prompt).logits
        with plugged as adapted:
            with_adapter = adapted(**prompt).logits
    assert not torch.allclose(alone, with_adapter), "the plug-in computes what the LLM alone does"


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
    assert results["failures"] == [] and results["metrics"]["plugin"] == results["history"][-1]["plugin"]


# Methods whose clients train through the shared DP-SGD path with the default adapter; every other one must
# refuse DP, not ignore it (LLEOT's default soft prompt is a module Opacus has no per-example gradient for).
DP_METHODS = {"offsite", "fedproxy", "fedcot"}
# The membership-inference audit plugs the final adapter into the LLM; FedCoT's adapter is its SLM's.
MIA_METHODS = {"offsite", "fedproxy"}


@pytest.mark.parametrize("method", method_names())
def test_dp_runs_with_its_epsilon_or_is_refused(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    sections = TINY_METHOD_SECTIONS.get(method, {})
    if method == "fedcot":  # a second (label-only) training pass would spend more budget: refused under DP
        sections = {"fedcot": {**sections["fedcot"], "label_only_baseline": False}}
    overrides = {
        **sections,
        "baselines": {"centralized": False, "local_only": False},
        "privacy": {
            "dp": {"enabled": True, "noise_multiplier": 1.0},
            "audit": {"membership_inference": method in MIA_METHODS, "mia_examples": 8},
        },
    }
    config = tiny_run_config(method, tiny_model_dir, overrides)
    if method not in DP_METHODS:
        # Its clients refuse to train, so the server is left without replies.
        with pytest.raises(TooFewClientsError, match=r"DP-SGD|plain training refused|not supported"):
            results = run_experiment(config, tmp_path / "run", progress=False)
            assert results["failures"] == [], results["failures"]  # a run that survived without DP fails here
        return
    results = run_experiment(config, tmp_path / "run", progress=False)
    dp = results["privacy"]["dp"]
    assert dp["enabled"] and 0 < dp["epsilon"] < float("inf")
    assert list(dp["epsilon_by_round"]) == ["1", "2"] and dp["epsilon_by_round"]["1"] < dp["epsilon_by_round"]["2"]
    assert results["failures"] == []
    if method not in MIA_METHODS:
        return
    # the audit plugs the final adapter into the LLM the method's way (FedProxy's fits only its proxy)
    mia = results["privacy"]["membership_inference"]  # the adapter changed the members' losses
    assert mia["members"] == 8 and mia["mean_loss_members"] != pytest.approx(mia["mean_reference_loss_members"])
