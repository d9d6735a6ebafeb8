"""SecAgg+ and server-side DP through the real round loop, on a tiny model and the in-process grid."""

import json

import pytest
import torch
from safetensors.torch import load_file

from blindtune.conftest import tiny_run_config
from blindtune.privacy.config import SecAggConfig
from blindtune.runner import run_experiment

ONE_ROUND = {
    "federation": {"num_clients": 3, "rounds": 1},
    "eval": {"limit": 6},
    "baselines": {"centralized": False, "local_only": False},
}


def final_adapter(run_dir):
    return load_file(run_dir / "checkpoints" / "round-0001" / "adapter.safetensors")


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return out, run_experiment(tiny_run_config("offsite", tiny_model_dir, ONE_ROUND), out, progress=False)


def test_secure_aggregation_gives_the_plain_aggregate_and_hides_the_updates(plain_run, tiny_model_dir, tmp_path):
    plain_dir, plain = plain_run
    overrides = {**ONE_ROUND, "privacy": {"secagg": {"enabled": True}}}
    secure = run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path, progress=False)

    expected, got = final_adapter(plain_dir), final_adapter(tmp_path)
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    # Each client scales its values by examples / max_weight and rounds them to the quantisation step
    # (an error below one step); the server divides the sum by the summed scales. Quantised, so not exact.
    step = secure["privacy"]["secagg"]["quantization_step"]
    scales = [row["num_examples"] / SecAggConfig().max_weight for row in secure["clients"]]
    assert 0 < worst <= len(scales) * step / sum(scales), (worst, step)
    changed = max(float((expected[k] - got[k]).abs().max()) for k in expected if "lora_B" in k)
    assert changed < 1e-4
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)  # trained, not the start

    # The server received masked integers and metrics, never a client's adapter.
    received = secure["cost"]["bytes_by_kind"]["to_server"]
    assert "adapter" not in received and received["fitres.parameters"] == 0  # emptied by secaggplus_mod
    assert received["secaggplus_configs"] > 0  # keys, ciphertexts, masked integer vectors
    assert plain["cost"]["bytes_by_kind"]["to_server"]["adapter"] > 0
    assert secure["privacy"]["secagg"]["enabled"] and secure["privacy"]["ledger"]["passed"]
    assert [row["train_loss"] for row in secure["history"]] == pytest.approx(
        [row["train_loss"] for row in plain["history"]]
    )
    assert len(secure["clients"]) == 3 and secure["failures"] == []


def test_server_dp_without_noise_or_clipping_is_the_plain_mean_and_reports_epsilon(plain_run, tiny_model_dir, tmp_path):
    plain_dir, _ = plain_run
    overrides = {
        **ONE_ROUND,
        "privacy": {"server_dp": {"enabled": True, "noise_multiplier": 0.0, "clipping_norm": 1e6}},
    }
    run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path / "exact", progress=False)
    expected, got = final_adapter(plain_dir), final_adapter(tmp_path / "exact")
    for name in expected:  # the three clients hold 2000 examples each: weighted = uniform mean
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)

    overrides["privacy"]["server_dp"] = {"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 0.5}
    noisy = run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path / "noisy", progress=False)
    server_dp = noisy["privacy"]["server_dp"]
    assert server_dp["enabled"] and server_dp["rounds"] == 1 and 0 < server_dp["epsilon"] < 100
    assert noisy["history"][0]["server_dp_epsilon"] == server_dp["epsilon"]
    saved = json.loads((tmp_path / "noisy" / "results.json").read_text())
    assert saved["privacy"]["server_dp"]["epsilon"] == server_dp["epsilon"]
