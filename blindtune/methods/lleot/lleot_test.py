"""LLEOT's config and its privacy measurements end to end on a tiny model (short budgets)."""

import json
import math

import pytest

from blindtune.config import ConfigError
from blindtune.federation.checkpoint import latest_checkpoint
from blindtune.methods import run_config_from_dict
from blindtune.models import tiny_model
from blindtune.models.adapters import AdapterKind
from blindtune.runner import run_experiment


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-model")
    loaded = tiny_model(num_layers=8, hidden_size=32)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def _config(method, model_dir, section):
    return run_config_from_dict(
        {
            "method": method,
            "model": str(model_dir),
            "task": "wordnet-supersense",
            "federation": {"num_clients": 2, "rounds": 1, "engine": "inprocess"},
            "train": {"steps": 1, "batch_size": 4, "max_length": 64},
            "eval": {"limit": 8, "batch_size": 8},
            "baselines": {"centralized": False, "local_only": False},
            method: section,
        }
    )


def test_defaults_follow_the_paper_and_sections_are_strict(tiny_model_dir):
    method = _config("lleot", tiny_model_dir, {}).method_config
    assert method.adapter.kind is AdapterKind.SOFT_PROMPT and method.adapter.prompt_length == 5
    assert method.elevation.margin == 4.0 and method.distill.proxy.std == 20.0
    assert (method.distill.lm_weight, method.distill.ppd_weight, method.distill.kd_weight) == (1.0, 10.0, 30.0)
    with pytest.raises(ConfigError, match="unknown key"):
        _config("lleot", tiny_model_dir, {"elevation": {"hight": 3}})
    with pytest.raises(ConfigError):
        _config("lleot", tiny_model_dir, {"distill": {"proxy": {"token_fraction": 2.0}}})


SHORT = {"steps": 2, "batch_size": 4, "max_length": 16}


@pytest.mark.parametrize(
    ("method", "section"),
    [
        ("lleot", {"adapter": {"kind": "lora", "lora_rank": 2}, "distill": SHORT, "elevation": SHORT}),
        ("offsite", {"adapter": {"kind": "soft_prompt"}, "distill": SHORT, "privacy": {}}),
    ],
    ids=["lleot-lora", "offsite-distilled-soft-prompt"],
)
def test_privacy_is_measured_and_reported(method, section, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    results = run_experiment(_config(method, tiny_model_dir, section), tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    privacy = saved["privacy"]["emulator"]
    assert set(saved["details"]) == {"emulator"}  # the method's privacy figures went to the privacy section
    for key in ("emulator_ppl", "llm_ppl", "ppl_ratio", "cpl", "gradient_cosine", "gradient_cosine_final"):
        assert math.isfinite(privacy[key]) or key == "cpl", key
    assert privacy["ppl_ratio"] == pytest.approx(privacy["emulator_ppl"] / privacy["llm_ppl"])
    assert {"wordnet-supersense", "wordnet-definition"} <= set(privacy["tasks"])  # + PIQA where present
    # Measured on the untrained adapter, then again on the trained one: a different adapter.
    assert privacy["gradient_cosine_final"] != pytest.approx(privacy["gradient_cosine"], abs=1e-6)
    assert results["metrics"]["gradient_cosine"] == privacy["gradient_cosine"]
    if method == "lleot":
        assert privacy["expected_ppl_ratio"] == pytest.approx(math.exp(4.0))
    for key in ("cpl", "ppl_ratio", "gradient_cosine"):
        assert key in results["metrics"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "ppl_ratio" in report
    assert f"{privacy['emulator_ppl']:.1f} / {privacy['llm_ppl']:.1f}" in report  # the privacy table
    assert list((tmp_path / "cache" / "emulators").glob("*.safetensors"))


@pytest.mark.parametrize("method", ["offsite", "lleot"])
def test_bottom_only_adapter_trains_and_sends_only_the_bottom_layers(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    section = {"adapter": {"kind": "lora", "lora_rank": 2}, "train_top_layers": False, "distill": SHORT}
    if method == "lleot":
        section["elevation"] = SHORT
    config = _config(method, tiny_model_dir, section)
    run_experiment(config, tmp_path / "run", progress=False)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None
    layers = {int(name.split(".")[1]) for name in checkpoint[1]}
    assert layers == {0, 1, 2}  # 8 layers, 3 per side: the top three ship frozen
