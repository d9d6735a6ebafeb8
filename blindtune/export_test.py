"""Export on tiny runs: the merged model, PEFT-on-base and the run's own plug-in give the same logits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from blindtune.config import merge
from blindtune.conftest import tiny_run_config
from blindtune.export import ExportError, export_run, export_target, run_config_of
from blindtune.federation.checkpoint import latest_checkpoint
from blindtune.federation.strategies import configured_strategy
from blindtune.models import load_model
from blindtune.runner import run_experiment

NO_BASELINES = {"baselines": {"centralized": False, "local_only": False}}
TEXTS = ["The cat sat on the mat", "Question: what is a noun?"]


def _run(method, tiny_model_dir, path, overrides=None):
    config = tiny_run_config(method, tiny_model_dir, {**NO_BASELINES, **(overrides or {})})
    run_experiment(config, path, progress=False)
    return path


def _logits(model, tokenizer):
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.float()


def _run_plugin_logits(run_dir):
    """The logits of the LLM with the final adapter plugged in the way the run's server does it."""
    config = run_config_of(run_dir)
    llm = load_model(config.model)
    state = latest_checkpoint(run_dir / "checkpoints")[1]
    strategy = configured_strategy(config.federation, config.method_config.adapter)
    with strategy.plugged_in(llm.model, state) as plugged:
        return _logits(plugged, llm.tokenizer), llm


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return _run("offsite", tiny_model_dir, tmp_path_factory.mktemp("lora-run"))


def test_lora_export_merged_peft_and_plugin_logits_agree(lora_run, tmp_path):
    exported = export_run(lora_run, tmp_path / "out")
    plugin, llm = _run_plugin_logits(lora_run)
    merged = AutoModelForCausalLM.from_pretrained(exported.merged)
    assert (exported.merged / "model.safetensors").is_file() and (exported.merged / "tokenizer.json").is_file()
    torch.testing.assert_close(_logits(merged, llm.tokenizer), plugin, atol=1e-5, rtol=0)
    # A real PEFT adapter: PEFT's key names and config, loaded by peft alone onto the base it names.
    adapter_config = json.loads((exported.adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert Path(adapter_config["base_model_name_or_path"]) == Path(run_config_of(lora_run).model).resolve()
    keys = load_file(exported.adapter / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    on_base = PeftModel.from_pretrained(base, exported.adapter)
    torch.testing.assert_close(_logits(on_base, llm.tokenizer), plugin, atol=1e-5, rtol=0)
    # The adapter changed the model (else the agreement above would prove nothing).
    assert (_logits(llm.model, llm.tokenizer) - plugin).abs().max() > 1e-4
    card = (exported.merged / "README.md").read_text()
    assert "offsite" in card and "round 2 of 2" in card and "--limit 12 --batch-size 6" in card


def test_eval_of_the_merged_model_reproduces_the_plugin_accuracy(lora_run, tmp_path):
    from blindtune.data import load_task
    from blindtune.eval.tasks import evaluate_examples

    exported = export_run(lora_run, tmp_path / "out")
    config = run_config_of(lora_run)
    merged = load_model(str(exported.merged))
    task = load_task(config.task)
    accuracy = evaluate_examples(
        merged.model, merged.tokenizer, task.test[: config.eval.limit], task.kind, batch_size=config.eval.batch_size
    )
    results = json.loads((lora_run / "results.json").read_text())
    assert accuracy == results["metrics"]["plugin"]


def test_a_crashed_run_exports_its_last_complete_round(lora_run, tmp_path):
    crashed = tmp_path / "crashed"
    shutil.copytree(lora_run, crashed)
    (crashed / "results.json").unlink()
    (crashed / "checkpoints" / "round-0002" / "meta.json").unlink()  # round 2 never finished writing
    exported = export_run(crashed, tmp_path / "out")
    assert exported.round == 1
    assert "round 1 of 2 (the run did not finish" in (exported.adapter / "README.md").read_text()
    with pytest.raises(ExportError, match=r"round 2 has no complete checkpoint.*\[1\]"):
        export_run(crashed, tmp_path / "again", round_number=2)


@pytest.mark.parametrize("method", ["offsite", "lleot"])
def test_soft_prompt_exports_as_peft_prompt_tuning(method, tiny_model_dir, tmp_path, monkeypatch):
    from blindtune.methods.methods_test import TINY_METHOD_SECTIONS

    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    overrides = merge(TINY_METHOD_SECTIONS.get(method, {}), {method: {"adapter": {"kind": "soft_prompt"}}})
    run_dir = _run(method, tiny_model_dir, tmp_path / "run", overrides)
    exported = export_run(run_dir, tmp_path / "out")
    assert exported.merged is None and exported.adapter is not None
    assert json.loads((exported.adapter / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    plugin, llm = _run_plugin_logits(run_dir)
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), exported.adapter)
    length = on_base.peft_config["default"].num_virtual_tokens
    torch.testing.assert_close(_logits(on_base, llm.tokenizer)[:, length:], plugin, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("offsite", {"offsite": {"adapter": {"kind": "layers"}}}),
        ("offsite", {"federation": {"strategy": "flora"}}),
    ],
    ids=["layers", "flora"],
)
def test_layer_adapters_export_merged_and_flora_as_scale_one_lora(method, overrides, tiny_model_dir, tmp_path):
    run_dir = _run(method, tiny_model_dir, tmp_path / "run", overrides)
    exported = export_run(run_dir, tmp_path / "out")
    plugin, llm = _run_plugin_logits(run_dir)
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(exported.merged), llm.tokenizer), plugin, atol=1e-5, rtol=0
    )
    if overrides["federation" if "federation" in overrides else "offsite"].get("strategy") == "flora":
        on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), exported.adapter)
        torch.testing.assert_close(_logits(on_base, llm.tokenizer), plugin, atol=1e-5, rtol=0)
    else:
        assert exported.adapter is None and "layers" in exported.notes[0]


def test_parties_are_checked(lora_run, tmp_path):
    with pytest.raises(ExportError, match="adapts the server's LLM"):
        export_run(lora_run, tmp_path / "out", party="client-0")
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("method", ["fedproxy", "fedmkt", "fedcot"])
def test_other_methods_export_the_model_they_adapted(method, tiny_model_dir, tmp_path, monkeypatch):
    from blindtune.methods.methods_test import TINY_METHOD_SECTIONS

    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    run_dir = _run(method, tiny_model_dir, tmp_path / "run", TINY_METHOD_SECTIONS[method])
    party = "client-0" if method == "fedcot" else None
    exported = export_run(run_dir, tmp_path / "out", party=party)
    target = export_target(run_config_of(run_dir), party)
    with target.plugged(latest_checkpoint(run_dir / "checkpoints")[1]) as plugged:
        plugin = _logits(plugged, target.base.tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(exported.merged)
    torch.testing.assert_close(_logits(merged, target.base.tokenizer), plugin, atol=1e-5, rtol=0)
    if method == "fedproxy":
        assert exported.adapter is None and "scattered" in exported.notes[0]
        return
    base_dir = json.loads((exported.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (method == "fedcot") == (Path(base_dir) == (tmp_path / "out" / "base").resolve())
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), exported.adapter)
    torch.testing.assert_close(_logits(on_base, target.base.tokenizer), plugin, atol=1e-5, rtol=0)


def test_the_export_command(lora_run, tmp_path):
    from typer.testing import CliRunner

    from blindtune.cli import app

    result = CliRunner().invoke(app, ["export", str(lora_run), "--out", str(tmp_path / "out"), "--round", "1"])
    assert result.exit_code == 0, result.output
    assert "exported round 1 of 2" in result.output and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert f"blindtune run {lora_run}/config.json" in (tmp_path / "out" / "merged" / "README.md").read_text()
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no config.json" in result.output
