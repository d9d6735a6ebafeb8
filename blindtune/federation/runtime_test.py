"""The federation runtime end to end on a tiny model: strategies, heterogeneous clients, failures, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
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


@pytest.fixture
def ctrl_c_in_round(monkeypatch):
    """Ctrl-C while client 1 trains in the round the test names (KeyboardInterrupt from the client)."""
    original = OffsiteTuning.client
    when = {"round": None}

    def client(self, kind, content, run):
        training = kind is MessageKind.TRAIN and run.partition_id == 1
        if training and int(content[RecordKey.INSTRUCTIONS]["round"]) == when["round"]:
            raise KeyboardInterrupt
        return original(self, kind, content, run)

    monkeypatch.setattr(OffsiteTuning, "client", client)
    return when


def test_ctrl_c_in_process_keeps_the_last_round_and_resumes_to_the_same(ctrl_c_in_round, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    config = tiny_run_config("offsite", tiny_model_dir, {**NO_BASELINES, "federation": {"rounds": 3}})
    run_experiment(config, tmp_path / "uninterrupted", progress=False)

    interrupted = tmp_path / "interrupted"
    ctrl_c_in_round["round"] = 2
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, interrupted, progress=False)
    assert sorted(p.name for p in (interrupted / "checkpoints").glob("round-*")) == ["round-0001"]
    assert json.loads((interrupted / "federation.json").read_text())["status"] == "interrupted"
    assert not (interrupted / "results.json").exists()

    ctrl_c_in_round["round"] = None
    results = run_experiment(config, interrupted, progress=False, resume=True)
    assert [row["round"] for row in results["history"]] == [1, 2, 3]
    final = "checkpoints/round-0003/adapter.safetensors"
    expected, resumed = load_file(tmp_path / "uninterrupted" / final), load_file(interrupted / final)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_ctrl_c_on_the_command_line_says_how_to_resume(ctrl_c_in_round, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from blindtune.cli import app

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_config("offsite", tiny_model_dir, NO_BASELINES).to_dict()))
    ctrl_c_in_round["round"] = 2
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(config_file), "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert "round 1 is checkpointed" in result.output
    assert f"continue with: blindtune run {config_file} --out {out} --resume" in " ".join(result.output.split())


@pytest.mark.slow
def test_ctrl_c_on_the_simulation_engine_ends_and_leaves_no_process(tiny_model_dir, tmp_path):
    overrides = {**NO_BASELINES, "federation": {"rounds": 30, "engine": "simulation"}}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_run_config("offsite", tiny_model_dir, overrides).to_dict()))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "blindtune.cli", "run", str(config_file), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "round-0001").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "run ended before round 1"
        time.sleep(0.1)
    # The simulation's SuperLink, SuperExec, simulation process and Ray workers, in sessions of their own.
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert any("flower-superlink" in " ".join(child.cmdline()) for child in descendants)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("the run did not end within 60 s of Ctrl-C") from None
    assert process.returncode == 130, output
    assert "--resume" in output
    time.sleep(2)
    left = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _session(pid) == process.pid]
    assert left == [], f"processes left behind: {left}"
    _, alive = psutil.wait_procs(descendants, timeout=20)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == [], f"processes left behind: {alive}"
    assert (out / "checkpoints" / "round-0001" / "adapter.safetensors").is_file()


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
