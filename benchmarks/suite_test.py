"""Cheap checks of the suite's plumbing on synthetic results (no model is run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import ExchangeTimings, federation_overhead
from benchmarks.scale import slope
from benchmarks.suite import (
    BUDGETS,
    CONFIG_DIR,
    GENERATION_TASKS_NOTE,
    base_config,
    committed_run_seconds,
    merge_utility,
    method_result_name,
    method_task_kinds,
    summary_rows,
    write_page,
)
from blindtune.methods import load_run_config, run_config_from_dict


def fake_run(method: str, task: str, seed: int, plugin: float, **metrics: float) -> dict[str, Any]:
    return {
        "method": method,
        "model": "smollm2-135m-instruct",
        "task": task,
        "num_clients": 3,
        "rounds": 2,
        "metrics": {"llm_zero_shot": 0.4 + seed / 100, "emulator_zero_shot": 0.2, "plugin": plugin, **metrics},
        "cost": {"bytes_to_clients": 3 * 1000 + 2 * 300, "bytes_to_server": 2 * 300, "wall_seconds": 10.0},
        "history": [
            {"round": r, "plugin": plugin, "train_loss": 1.0, "bytes_to_clients": 300, "bytes_to_server": 300}
            for r in (1, 2)
        ],
        "clients": [{"round": r, "node_id": n, "train_seconds": 1.0} for r in (1, 2) for n in range(3)],
        "config": {
            "seed": seed,
            "train": {"steps": 6, "batch_size": 8},
            "federation": {"rounds": 2, "num_clients": 3, "engine": "inprocess"},
            "eval": {"limit": 200},
        },
    }


def write_runs(out: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    entries = []
    for run in runs:
        run_dir = out / "runs" / run["task"] / run["method"] / f"seed{run['config']['seed']}"
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(run))
        federation = {"rounds": [{"round_seconds": 4.0, "client_train_seconds": 3.0, "overhead_seconds": 1.0}]}
        entries.append(
            {
                "task": run["task"],
                "method": run["method"],
                "seed": run["config"]["seed"],
                "dir": str(run_dir),
                "status": "ran",
                "wall_seconds": 10.0,
                "federation": federation,
            }
        )
    entries.append({"task": "piqa", "method": "lleot", "seed": 0, "dir": "", "status": "failed", "error": "Boom: x"})
    return {
        "tasks": {
            "piqa": {"kind": "multiple_choice", "unavailable": None, "methods": ["lleot", "offsite"]},
            "gsm8k": {"kind": "generation", "unavailable": None, "methods": []},
            "pubmedqa": {"kind": None, "unavailable": "FileNotFoundError: no data", "methods": []},
        },
        "runs": entries,
    }


def test_summary_has_a_row_per_setting_and_the_page_is_written(tmp_path: Path) -> None:
    runs = [
        fake_run("offsite", "piqa", 0, 0.6, centralized=0.7, local_only=0.5),
        fake_run("offsite", "piqa", 1, 0.62, centralized=0.72, local_only=0.52),
    ]
    utility = write_runs(tmp_path, runs)
    from benchmarks.suite import load_runs

    rows = summary_rows(utility, load_runs(utility, tmp_path))
    moved = tmp_path / "committed"
    moved.mkdir()
    (tmp_path / "runs").rename(moved / "runs")
    assert summary_rows(utility, load_runs(utility, moved)) == rows  # found under the copy, not at "dir"
    settings = {row["setting"]: row for row in rows if row["task"] == "piqa"}
    assert settings["LLM zero-shot"]["seeds"] == 2
    assert settings["offsite: plug-in"]["mean"] == pytest.approx(0.61)
    assert settings["offsite: plug-in"]["examples_seen"] == 288
    assert settings["offsite: emulator zero-shot"]["cpl"] == pytest.approx(100 * 0.2 / 0.405, rel=1e-3)
    assert "centralised LoRA, pooled data (upper bound)" in settings
    assert "offsite: local only, client 0 (lower bound)" in settings
    assert "failed: Boom: x" in settings["lleot seed 0"]["note"]
    assert [row["note"] for row in rows if row["task"] == "gsm8k"] == [GENERATION_TASKS_NOTE]
    assert "not available" in next(row["note"] for row in rows if row["task"] == "pubmedqa")

    scale = {
        "setting": "s",
        "model": "m",
        "points": [
            {
                "engine": "inprocess",
                "clients": n,
                "wall_seconds": n,
                "round_seconds": n / 2,
                "round_overhead_seconds": 0.1,
                "peak_tree_rss_bytes": 1e8 + n,
                "client_disk_bytes": 1e6 * n,
            }
            for n in (2, 8)
        ],
        "per_client": {
            "inprocess": {
                "wall_seconds_per_client": 1.0,
                "round_seconds_per_client": 0.5,
                "peak_rss_bytes_per_client": 1.0,
                "client_disk_bytes_per_client": 1e6,
            }
        },
        "resident_clients_check": {
            "clients_resident_at_once": False,
            "peak_rss_bytes_per_client": 1.0,
            "one_client_emulator_bytes": 1e6,
        },
    }
    suite = {
        "budget": BUDGETS["quick"].__dict__,
        "command": "python -m benchmarks.suite --quick",
        "started": "now",
        "machine": {"cpu_count": 2},
        "wall_seconds": 60.0,
        "cpu_seconds": 100.0,
        "utility": utility,
        "summary": rows,
        "full_model_bytes": 540_000_000,
        "scale": scale,
    }
    page = write_page(suite, moved).read_text()
    # 2 seeds x 200 examples pooled: about +- 4.8 points; the LLM (40.5%) lies far below
    assert "| piqa | offsite: plug-in | 61.0% ± 1.4 | 56.0-65.8 | above | 2 | 288 |" in page
    assert "| piqa | offsite: local only, client 0 (lower bound) | 51.0% ± 1.4 |" in page
    assert "## Communication" in page and "## Scale" in page and "## Federation overhead per round" in page
    assert (moved / "utility_vs_privacy.png").is_file() and (moved / "scale.png").is_file()
    assert (moved / "runs" / "report.md").is_file()


def test_base_config_per_method() -> None:
    assert base_config("quick", "offsite")["method"] == "offsite"
    lleot = base_config("quick", "lleot")
    offsite = base_config("quick", "offsite")
    tuned = {"server_learning_rate"}  # the method's own, like its learning rate
    assert lleot["method"] == "lleot"
    assert {k: v for k, v in lleot["federation"].items() if k not in tuned} == {
        k: v for k, v in offsite["federation"].items() if k not in tuned
    }
    assert "server_learning_rate" not in base_config("quick", "fedproxy")["federation"]
    budget = ("steps", "batch_size")  # the same examples seen; the learning rate is the method's own
    assert {k: lleot["train"][k] for k in budget} == {k: offsite["train"][k] for k in budget}
    other = base_config("full", "some-new-method")
    assert other["method"] == "some-new-method" and "offsite" not in other


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("bench_*.yaml")), ids=lambda p: p.name)
def test_bench_configs_load(path: Path) -> None:
    config = load_run_config(path)
    assert run_config_from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_merge_utility_replaces_rerun_entries() -> None:
    old = {"tasks": {"a": {}}, "runs": [{"task": "a", "method": "m", "seed": 0, "v": 1}]}
    new = {"tasks": {"b": {}}, "runs": [{"task": "a", "method": "m", "seed": 0, "v": 2}]}
    merged = merge_utility(old, new)
    assert set(merged["tasks"]) == {"a", "b"} and merged["runs"] == new["runs"]


def test_merge_utility_keeps_the_methods_of_a_task_rerun_for_one_method() -> None:
    old = {"tasks": {"a": {"methods": ["m", "n"]}}, "runs": []}
    new = {"tasks": {"a": {"methods": ["n", "o"]}}, "runs": []}
    assert merge_utility(old, new)["tasks"]["a"]["methods"] == ["m", "n", "o"]


def test_merge_utility_adds_the_wall_time_of_kept_runs() -> None:
    old = {"tasks": {"a": {}}, "runs": [{"task": "a", "method": "m", "seed": 0, "wall_seconds": 30.0}]}
    new = {
        "tasks": {"b": {}},
        "runs": [{"task": "b", "method": "m", "seed": 0, "wall_seconds": 50.0}],
        "wall_seconds": 20.0,
    }
    merged = merge_utility(old, new)
    assert len(merged["runs"]) == 2 and merged["wall_seconds"] == pytest.approx(50.0)


def test_committed_run_seconds_reads_seed_0_of_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("benchmarks.suite.RESULTS_DIR", tmp_path)
    assert committed_run_seconds("quick") == {}
    (tmp_path / "quick").mkdir()
    runs = [
        {"task": "a", "method": "m", "seed": 0, "wall_seconds": 5.0},
        {"task": "a", "method": "m", "seed": 1, "wall_seconds": 9.0},
        {"task": "b", "method": "m", "seed": 0, "status": "failed"},
    ]
    (tmp_path / "quick" / "suite.json").write_text(json.dumps({"utility": {"runs": runs}}))
    assert committed_run_seconds("quick") == {("a", "m"): 5.0}


def test_slope_and_overhead() -> None:
    assert slope([{"clients": 2, "x": 4.0}, {"clients": 8, "x": 10.0}], "x") == pytest.approx(1.0)
    assert slope([{"clients": 2, "x": 4.0}], "x") is None
    timings = ExchangeTimings(
        [{"kind": "query.setup", "round": 0, "seconds": 2.0}, {"kind": "train", "round": 1, "seconds": 5.0}]
    )
    overhead = federation_overhead(timings, [{"round": 1, "train_seconds": 1.5}] * 2)
    assert overhead["mean_overhead_seconds"] == pytest.approx(2.0) and overhead["setup_seconds"] == 2.0


def test_fedcot_is_the_generation_method_and_names_its_result() -> None:
    assert method_task_kinds("fedcot") == {"multiple_choice", "generation"}
    assert method_task_kinds("offsite") == {"multiple_choice"}
    assert method_result_name("fedcot") == "client SLM"
    assert method_result_name("fedproxy") == "plug-in"
