"""Instruction data through the methods on a tiny model: offsite, LLEOT, FedProxy and FedMKT train on it;
FedCoT refuses it."""

import json

import pytest

from blindtune.conftest import tiny_run_config
from blindtune.methods.methods_test import TINY_METHOD_SECTIONS
from blindtune.runner import RunFailedError, run_experiment


@pytest.fixture(scope="module")
def instruction_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("instruction") / "pairs.jsonl"
    rows = [{"prompt": f"Repeat the word {w}.", "response": f"{w} {w}"} for w in "abcdefghijklmnopqrst"]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("method", ["offsite", "lleot", "fedproxy", "fedmkt"])
def test_adapter_methods_train_on_instruction_data(method, instruction_file, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    overrides = {
        **TINY_METHOD_SECTIONS.get(method, {}),
        "task": str(instruction_file),
        "baselines": {"centralized": False, "local_only": False},
    }
    results = run_experiment(tiny_run_config(method, tiny_model_dir, overrides), tmp_path / "run", progress=False)
    metrics = results["metrics"]
    assert results["metric"] == "response_nll"
    assert 0 < metrics["llm_zero_shot"] < 50 and 0 < metrics["plugin"] < 50  # nats per response token
    if method == "offsite":  # the export's model card reports NLLs, not accuracies
        from blindtune.export import export_run

        card = (export_run(tmp_path / "run", tmp_path / "out").merged / "README.md").read_text()
        assert "test response NLL" in card and f"| plugin | {metrics['plugin']:.4f} |" in card


def test_fedcot_refuses_instruction_data(instruction_file, tiny_model_dir, tmp_path):
    overrides = {**TINY_METHOD_SECTIONS["fedcot"], "task": str(instruction_file)}
    with pytest.raises(
        (RunFailedError, ValueError), match=r"fedcot is not supported for this task kind \(instruction\)"
    ):
        run_experiment(tiny_run_config("fedcot", tiny_model_dir, overrides), tmp_path / "run", progress=False)
