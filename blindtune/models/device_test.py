"""Device selection and dtypes (on the CPU), and a tiny run plus its export on CUDA (marked gpu)."""

import pytest
import torch

from blindtune.config import ConfigError
from blindtune.methods import run_config_from_dict
from blindtune.models.device import CPU, DeviceError, active_placement, place, placed, resolve_placement
from blindtune.models.loading import load_model


def test_auto_is_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement("auto") == CPU and resolve_placement("cpu") == CPU
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_placement("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_placement("auto").device.type == "cuda" and resolve_placement("auto").dtype == torch.float32
    assert resolve_placement("cuda", bf16=True).dtype == torch.bfloat16
    assert resolve_placement("cpu") == CPU  # asked for explicitly, the CPU wins over a present GPU


def test_bf16_is_refused_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="bf16 needs a CUDA device"):
        resolve_placement("auto", bf16=True)
    with pytest.raises(DeviceError, match="bf16 needs a CUDA device"):
        resolve_placement("cpu", bf16=True)


def test_models_load_on_the_active_placement(tiny_model_dir):
    assert active_placement() == CPU
    bf16_on_cpu = type(CPU)(torch.device("cpu"), torch.bfloat16)  # only to see the dtype followed
    with placed(bf16_on_cpu):
        assert load_model(str(tiny_model_dir)).model.dtype == torch.bfloat16
    assert active_placement() == CPU
    model = load_model(str(tiny_model_dir)).model
    assert model.dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    assert place(model).dtype == torch.float32


def test_run_config_device_key():
    config = run_config_from_dict({"method": "offsite", "device": "cpu"})
    assert config.placement() == CPU and run_config_from_dict({"method": "offsite"}).device == "auto"
    with pytest.raises(ConfigError, match="device: 'tpu' is not one of auto, cpu, cuda"):
        run_config_from_dict({"method": "offsite", "device": "tpu"})


def test_simulated_clients_get_a_gpu_share_only_on_cuda():
    from blindtune.federation.engine import simulated_nodes

    assert [simulated_nodes(4, gpu=True).gpus, simulated_nodes(4, gpu=False).gpus] == [0.25, 0.0]


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
def test_quick_offsite_run_and_export_on_cuda(bf16, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from blindtune.conftest import tiny_run_config
    from blindtune.export import export_run
    from blindtune.runner import run_experiment

    overrides = {"device": "cuda", "bf16": bf16, "baselines": {"centralized": True, "local_only": True}}
    results = run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path / "run", progress=False)
    assert 0 <= results["metrics"]["plugin"] <= 1 and results["failures"] == []
    with placed(resolve_placement("cuda", bf16)):
        exported = export_run(tmp_path / "run", tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(exported.merged)
    assert merged.dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_cli_refuses_cuda_without_a_gpu(monkeypatch):
    from typer.testing import CliRunner

    from blindtune.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["eval", "--device", "cuda", "--limit", "1"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
