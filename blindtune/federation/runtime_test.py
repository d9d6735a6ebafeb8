"""The federation runtime end to end on a tiny model: strategies, heterogeneous clients, failures, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from flwr.app import RecordDict

from blindtune.conftest import tiny_run_config
from blindtune.federation.records import MessageKind, RecordKey, record_to_tensors, tensors_to_record
from blindtune.federation.rounds import TooFewClientsError
from blindtune.methods.offsite import OffsiteTuning
from blindtune.runner import run_experiment

NO_BASELINES = {"baselines": {"centralized": False, "local_only": False}, "eval": {"every_round": False}}


def test_flora_with_heterogeneous_ranks_and_batch_sizes(tiny_model_dir, tmp_path):
    overrides = {
        **NO_BASELINES,
        "federation": {"strategy": "flora", "client_lora_ranks": [2, 4], "client_batch_sizes": [2, 3]},
    }
    results = run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path, progress=False)
    assert results["failures"] == []
    per_client = {(row["round"], row["node_id"]): row for row in results["clients"]}
    assert len(per_client) == 4
    assert sorted({row["examples_seen"] for row in per_client.values()}) == [4, 6]  # 2 steps x batch sizes
    assert results["metrics"]["plugin"] == results["history"][-1]["plugin"]  # the stacked adapter plugged in
    assert results["metrics"]["plugin"] * 12 == pytest.approx(round(results["metrics"]["plugin"] * 12))


def test_ffa_lora_uploads_half_of_lora_fedavg(tiny_model_dir, tmp_path):
    uploads = {}
    for strategy in ("fedavg", "ffa_lora"):
        overrides = {**NO_BASELINES, "federation": {"strategy": strategy}}
        results = run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path / strategy, False)
        uploads[strategy] = results["cost"]["bytes_by_kind"]["to_server"][RecordKey.ADAPTER]
    assert uploads["ffa_lora"] == pytest.approx(uploads["fedavg"] / 2, rel=0.02)


@pytest.fixture
def faulty_client(monkeypatch):
    """Client 1 misbehaves in training rounds as the test says: raise, or send NaN."""
    original = OffsiteTuning.client
    behaviour = {}

    def client(self, kind, content, run):
        reply = original(self, kind, content, run)
        if kind is MessageKind.TRAIN and run.partition_id == 1:
            if behaviour["mode"] == "crash":
                raise RuntimeError("client 1 lost its GPU")
            state = record_to_tensors(reply[RecordKey.ADAPTER])
            state = {name: torch.full_like(t, math.nan) for name, t in state.items()}
            metrics = reply[RecordKey.METRICS]
            return RecordDict({RecordKey.ADAPTER: tensors_to_record(state), RecordKey.METRICS: metrics})
        return reply

    monkeypatch.setattr(OffsiteTuning, "client", client)
    return behaviour


@pytest.mark.parametrize(("mode", "reason"), [("crash", "lost its GPU"), ("nan", "NaN")])
def test_failing_client_is_dropped_and_counted(faulty_client, mode, reason, tiny_model_dir, tmp_path):
    faulty_client["mode"] = mode
    overrides = {**NO_BASELINES, "federation": {"num_clients": 3, "min_clients": 2}}
    results = run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path, progress=False)
    assert [f["round"] for f in results["failures"]] == [1, 2]
    assert all(reason in f["reason"] for f in results["failures"])
    assert math.isfinite(results["metrics"]["plugin"])
    assert len({row["node_id"] for row in results["clients"] if row["used"]}) == 2


def test_too_few_replies_stop_the_run_with_a_clear_error(faulty_client, tiny_model_dir, tmp_path):
    faulty_client["mode"] = "crash"
    with pytest.raises(TooFewClientsError, match="1 of 2 clients replied"):
        run_experiment(tiny_run_config("offsite", tiny_model_dir, NO_BASELINES), tmp_path, progress=False)
    assert json.loads((tmp_path / "federation.json").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.ci
def test_killed_server_resumes_to_the_same_final_state(tiny_model_dir, tmp_path):
    config = tiny_run_config("offsite", tiny_model_dir, {**NO_BASELINES, "federation": {"rounds": 4}}).to_dict()
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "blindtune.cli", "run", str(config_file)]

    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run([*command, "--out", str(uninterrupted)], check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*command, "--out", str(interrupted)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (interrupted / "checkpoints" / "round-0002").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "run ended before round 2"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "results.json").exists()

    subprocess.run([*command, "--out", str(interrupted), "--resume"], check=True, capture_output=True)
    final = "checkpoints/round-0004/adapter.safetensors"
    from safetensors.torch import load_file

    expected, resumed = load_file(uninterrupted / final), load_file(interrupted / final)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    history = json.loads((interrupted / "results.json").read_text())["history"]
    assert [row["round"] for row in history] == [1, 2, 3, 4]
