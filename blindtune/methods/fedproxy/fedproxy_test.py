import json

import pytest

from blindtune.config import ConfigError
from blindtune.conftest import tiny_run_config
from blindtune.runner import run_experiment

NO_BASELINES = {"baselines": {"centralized": False, "local_only": False}}


def test_uncompressed_proxy_plugs_in_as_the_tuned_proxy_itself(tiny_model_dir, tmp_path, monkeypatch):
    """A proxy that keeps everything is the LLM: the plugged-in LLM must score exactly as the tuned proxy."""
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    overrides = {
        **NO_BASELINES,
        "federation": {"strategy": "ties", "ties_density": 0.5},
        "fedproxy": {"compression": {"target_fraction": 1.0, "num_layers": 8, "distill": None, "importance_texts": 8}},
    }
    results = run_experiment(tiny_run_config("fedproxy", tiny_model_dir, overrides), tmp_path / "run", progress=False)
    metrics = results["metrics"]
    assert metrics["emulator_zero_shot"] == metrics["llm_zero_shot"]
    assert [row["plugin"] for row in results["history"]] == [row["proxy"] for row in results["history"]]
    assert results["details"]["proxy"]["fraction_of_decoder"] == 1.0 and results["details"]["proxy"][
        "ppl_ratio"
    ] == pytest.approx(1.0)


def test_compressed_proxy_with_ties_and_full_layer_training(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    overrides = {
        **NO_BASELINES,
        "federation": {"strategy": "ties", "partition": "dirichlet", "dirichlet_alpha": 0.1},
        "fedproxy": {
            "adapter": {"kind": "layers"},
            "compression": {"target_fraction": 0.4, "importance_texts": 8, "distill": {"steps": 2, "batch_size": 2}},
        },
    }
    results = run_experiment(tiny_run_config("fedproxy", tiny_model_dir, overrides), tmp_path / "run", progress=False)
    proxy = results["details"]["proxy"]
    assert proxy["kept_layers"][0] == 0 and proxy["kept_layers"][-1] == 7 and len(proxy["kept_layers"]) < 8
    assert proxy["fraction_of_decoder"] == pytest.approx(0.4, abs=0.05) and proxy["distilled"]
    for key in ("plugin", "proxy", "emulator_zero_shot"):  # accuracies on the 12 test examples
        assert results["metrics"][key] * 12 == pytest.approx(round(results["metrics"][key] * 12)), key
    assert results["metrics"]["proxy"] == results["history"][-1]["proxy"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["details"]["proxy"]["parameters"] < saved["details"]["proxy"]["llm_parameters"]
    assert results["failures"] == []
    # Resuming a finished run re-evaluates nothing but the tuned proxy, from the last checkpoint.
    config = tiny_run_config("fedproxy", tiny_model_dir, overrides)
    resumed = run_experiment(config, tmp_path / "run", progress=False, resume=True)
    assert resumed["metrics"]["proxy"] == results["metrics"]["proxy"]
    assert resumed["metrics"]["plugin"] == results["metrics"]["plugin"]


def test_soft_prompts_are_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="lora or layers"):
        tiny_run_config("fedproxy", tiny_model_dir, {"fedproxy": {"adapter": {"kind": "soft_prompt"}}})
