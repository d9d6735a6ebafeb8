from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from blindtune.report import (
    ResultsError,
    format_bytes,
    format_seconds,
    load_results,
    rich_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(method: str, plugin: list[float], bytes_to_clients: int, **metrics: float) -> dict[str, Any]:
    return {
        "method": method,
        "model": "smollm2-135m-instruct",
        "task": "wordnet-supersense",
        "num_clients": 4,
        "rounds": len(plugin),
        "metrics": {"llm_zero_shot": 0.2251, "emulator_zero_shot": 0.18, "plugin": plugin[-1], **metrics},
        "cost": {
            "bytes_to_clients": bytes_to_clients,
            "bytes_to_server": 3 * 1024 * 1024,
            "wall_seconds": 125.0,
            "train_tokens_per_second": 1234.5,
        },
        "history": [
            {
                "round": index + 1,
                "plugin": accuracy,
                "train_loss": 2.0 / (index + 1),
                "bytes_to_clients": bytes_to_clients // len(plugin),
                "bytes_to_server": 1024 * 1024,
            }
            for index, accuracy in enumerate(plugin)
        ],
        "clients": [{"client": c, "num_examples": 100 + c, "train_loss": 1.5} for c in range(2)],
        "config": {"seed": 0},
    }


@pytest.fixture
def runs() -> list[dict[str, Any]]:
    return [
        make_run("offsite", [0.30, 0.35, 0.412], bytes_to_clients=300 * 1024 * 1024, centralized=0.5),
        make_run("fedavg-lora", [0.25, 0.333], bytes_to_clients=2 * 1024**3, local_only=0.2, perplexity=12.5),
    ]


def test_write_report_has_tables_and_plots(runs: list[dict[str, Any]], tmp_path: Path) -> None:
    report = write_report(runs, tmp_path / "out", title="demo")
    assert report == tmp_path / "out" / "report.md"
    text = report.read_text()
    assert text.startswith("# demo\n")
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    for column in [
        "LLM zero-shot",
        "emulator zero-shot",
        "plug-in",
        "local only",
        "centralized",
        "perplexity",
    ]:
        assert column in header
    offsite = next(line for line in text.splitlines() if line.startswith("| offsite |"))
    assert "| 22.5% | 18.0% | 41.2% | – | 50.0% | – |" in offsite
    assert "300.0 MiB" in offsite and "3.0 MiB" in offsite and "2 min 05 s" in offsite
    fedavg = next(line for line in text.splitlines() if line.startswith("| fedavg-lora |"))
    assert "33.3%" in fedavg and "20.0%" in fedavg and "| 12.5 |" in fedavg and "2.0 GiB" in fedavg
    assert "## Rounds: offsite" in text and "## Clients: fedavg-lora" in text
    assert "| 3 | 41.2% | 0.6667 | 100.0 MiB | 1.0 MiB |" in text  # the last round of offsite
    assert "| 1 | 101 | 1.5 |" in text
    for name in ["accuracy_per_round.png", "bytes_per_method.png"]:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_single_run_has_no_bytes_chart(runs: list[dict[str, Any]], tmp_path: Path) -> None:
    del runs[0]["history"], runs[0]["clients"]
    report = write_report(runs[:1], tmp_path)
    assert (tmp_path / "accuracy_per_round.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "bytes_per_method.png").exists()
    assert "## Rounds" not in report.read_text()
    with pytest.raises(ValueError, match="no runs"):
        write_report([], tmp_path)


def test_load_results_from_files_and_directories(runs: list[dict[str, Any]], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(runs[0]))
    (tmp_path / "b.json").write_text(json.dumps(runs[1]))
    assert load_results([tmp_path / "a", tmp_path / "b.json"]) == runs


def test_load_results_errors_name_the_file(runs: list[dict[str, Any]], tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="no such file"):
        load_results([tmp_path])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ResultsError, match=r"bad\.json: not valid JSON"):
        load_results([tmp_path / "bad.json"])
    incomplete = {key: value for key, value in runs[0].items() if key not in ("metrics", "cost")}
    (tmp_path / "incomplete.json").write_text(json.dumps(incomplete))
    with pytest.raises(ResultsError, match="missing metrics, cost"):
        load_results([tmp_path / "incomplete.json"])
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ResultsError, match="expected a JSON object"):
        load_results([tmp_path / "list.json"])


def test_rich_table_shows_metrics(runs: list[dict[str, Any]]) -> None:
    console = Console(width=120, record=True)
    console.print(rich_table(runs[1]))
    text = console.export_text()
    for expected in [
        "fedavg-lora",
        "LLM zero-shot",
        "22.5%",
        "33.3%",
        "local only",
        "perplexity",
        "12.5",
        "2.0 GiB",
    ]:
        assert expected in text


def test_formatting() -> None:
    assert [format_bytes(v) for v in (0, 1023, 1536, 5 * 1024**2, 3 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]
    assert [format_seconds(v) for v in (3.21, 125, 3 * 3600 + 65)] == ["3.2 s", "2 min 05 s", "3 h 01 min"]


def test_accuracy_intervals_capability_retained_and_one_panel_per_task(tmp_path):
    from blindtune.report import accuracy_interval, capability_retained, plot_utility_vs_privacy

    low, high = accuracy_interval(0.54, 200)
    assert low < 0.54 < high and 0.12 < high - low < 0.16  # about +- 7 points on 200 examples
    wide, narrow = accuracy_interval(0.5, 50), accuracy_interval(0.5, 800)
    assert wide[1] - wide[0] > 3 * (narrow[1] - narrow[0])
    assert capability_retained(0.25, 0.75, 0.25) == 0.0 and capability_retained(0.5, 0.75, 0.25) == 0.5
    assert capability_retained(0.3, 0.2, 0.25) is None  # the LLM at chance: nothing to retain

    def run(task: str, method: str, plugin: float) -> dict:
        metrics = {"llm_zero_shot": 0.3, "emulator_zero_shot": 0.2, "plugin": plugin, "centralized": 0.7}
        return {"task": task, "method": method, "metrics": metrics, "config": {"eval": {"limit": 200}}}

    runs = [run("a", "offsite", 0.5), run("a", "fedproxy", 0.6), run("b", "offsite", 0.4)]
    path = plot_utility_vs_privacy(runs, tmp_path / "plot.png", {"a": 0.1, "b": 0.25})
    figure_axes = __import__("matplotlib.image", fromlist=["imread"]).imread(path)
    assert path.is_file() and figure_axes.shape[1] > figure_axes.shape[0] * 1.5  # two panels side by side


def test_the_federation_gain_reads_as_points_beside_the_public_only_llm():
    from blindtune.report import format_metric

    assert format_metric("federation_gain", -0.035) == "-3.5 points"
    assert format_metric("llm_public_only", 0.405) == "40.5%"
    # an instruction run's rows are response NLLs, not accuracies
    assert format_metric("plugin", 1.393, nll=True) == "1.393 nats/token"
    assert format_metric("plugin", 0.95, nll=True) == "0.950 nats/token"


def test_the_rounds_table_says_when_earlier_rounds_were_scored_on_fewer_examples():
    from blindtune.report import round_scope

    assert round_scope({"config": {"eval": {"limit": 500, "round_limit": 200}}}) == [
        "Rounds before the last: scores on the first 200 evaluation examples; the last round on all 500.",
        "",
    ]
    assert round_scope({"config": {"eval": {"limit": 200, "round_limit": 200}}}) == []
    assert round_scope({"config": {"eval": {"limit": 500}}}) == []
