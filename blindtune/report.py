"""Turn runs' results.json files into a Markdown report with plots, and show one run in the terminal.

A run's results.json is a dict:

    {"method", "model", "task": str, "num_clients", "rounds": int,
     "metrics": {"llm_zero_shot", "emulator_zero_shot", "plugin": float, "local_only"?, "centralized"?, ...},
     "cost": {"bytes_to_clients", "bytes_to_server": int, "wall_seconds", "train_tokens_per_second": float},
     "history": [{"round": int, "plugin"?: float, "train_loss": float,
                  "bytes_to_clients", "bytes_to_server": int}],
     "clients": [{"client": int, "num_examples": int, "train_loss": float, ...}],
     "config": {...}}

Accuracies are fractions in [0, 1] and are shown as percentages. Metrics beyond the known ones are
shown too, so a new baseline needs no change here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import scipy.stats

matplotlib.use("Agg")  # files only: no display is needed, and none exists on a server
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from blindtune.eval.leakage import capability_retained

RESULTS_FILE = "results.json"
REQUIRED_KEYS = ("method", "model", "task", "num_clients", "rounds", "metrics", "cost")
# Known metrics in the order a reader compares them: the baselines first, then what the method achieved.
METRIC_ORDER = ("llm_zero_shot", "emulator_zero_shot", "plugin", "local_only", "centralized")
METRIC_TITLES = {
    "llm_zero_shot": "LLM zero-shot",
    "emulator_zero_shot": "emulator zero-shot",
    "plugin": "plug-in",
    "local_only": "local only",
    "centralized": "centralized",
    "llm_public_only": "LLM on the public set alone",
    "federation_gain": "federation's contribution (plug-in - public set alone)",
    "plugin_on_hand_out": "global adapter on the hand-out",
    "transfer_gap": "transfer gap (on the hand-out - plug-in)",
    "capability_retained": "hand-out's capability retained (above chance)",
}
# Keys that hold accuracies, hence shown as percentages; other metrics whose names hold one of these
# words are plain numbers even when they lie in [0, 1].
ACCURACY_KEYS = frozenset((*METRIC_ORDER, "plugin_on_hand_out", "hand_out"))
NOT_ACCURACY_WORDS = ("loss", "perplexity", "ppl", "seconds", "tokens", "bytes", "retained", "cosine")
MISSING = "–"


class ResultsError(ValueError):
    """A results file is missing or is not a run's results (the message names the file)."""


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read runs from results.json files, or from directories holding one."""
    runs = []
    for given in paths:
        path = Path(given)
        file = path / RESULTS_FILE if path.is_dir() else path
        if not file.is_file():
            raise ResultsError(f"{file}: no such file (pass a results.json or a run directory holding one)")
        try:
            run = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ResultsError(f"{file}: not valid JSON: {error}") from error
        if not isinstance(run, dict):
            raise ResultsError(f"{file}: expected a JSON object, found {type(run).__name__}")
        if missing := [key for key in REQUIRED_KEYS if key not in run]:
            raise ResultsError(f"{file}: missing {', '.join(missing)}")
        if not isinstance(run["metrics"], dict) or not isinstance(run["cost"], dict):
            raise ResultsError(f"{file}: 'metrics' and 'cost' must be JSON objects")
        runs.append(run)
    return runs


def write_report(runs: Sequence[dict[str, Any]], out_dir: Path, title: str = "blindtune report") -> Path:
    """Write out_dir/report.md (summary, per-round and per-client tables) and its PNG plots."""
    if not runs:
        raise ValueError("no runs to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    plots = [plot_accuracy_per_round(runs, labels, out_dir / "accuracy_per_round.png")]
    if len(runs) > 1:
        plots.append(plot_bytes_per_run(runs, labels, out_dir / "bytes_per_method.png"))
    lines = [f"# {title}", "", *summary_table(runs), ""]
    lines += [f"![{plot.stem.replace('_', ' ')}]({plot.name})" for plot in plots]
    for label, run in zip(labels, runs, strict=True):
        if run.get("history"):
            lines += ["", f"## Rounds: {label}", "", *round_scope(run), *rows_table(run["history"], scores_nll(run))]
    for label, run in zip(labels, runs, strict=True):
        if run.get("clients"):
            lines += ["", f"## Clients: {label}", "", *rows_table(run["clients"])]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def rich_table(run: dict[str, Any]) -> Table:
    """One run's metrics and costs, for the terminal."""
    table = Table(title=f"{run['method']} on {run['task']} ({run['model']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in metric_keys([run]):
        table.add_row(METRIC_TITLES.get(key, key), format_metric(key, run["metrics"].get(key), scores_nll(run)))
    cost = run["cost"]
    table.add_row("bytes to clients", format_bytes(cost.get("bytes_to_clients")))
    table.add_row("bytes to server", format_bytes(cost.get("bytes_to_server")))
    table.add_row("wall time", format_seconds(cost.get("wall_seconds")))
    table.add_row("train tokens/s", format_number(cost.get("train_tokens_per_second")))
    return table


def run_labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """A distinct label per run: the method, with the task if tasks differ, and #n if still equal."""
    several_tasks = len({run["task"] for run in runs}) > 1
    labels = [f"{run['method']} ({run['task']})" if several_tasks else str(run["method"]) for run in runs]
    return [f"{label} #{index + 1}" if labels.count(label) > 1 else label for index, label in enumerate(labels)]


def metric_keys(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The known metrics any run has, in METRIC_ORDER, then other metrics in order of first appearance."""
    present = {key: None for run in runs for key in run["metrics"]}
    return [key for key in METRIC_ORDER if key in present] + [key for key in present if key not in METRIC_ORDER]


def summary_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    metrics = metric_keys(runs)
    header = ["method", "task", "model", "clients", "rounds"]
    header += [METRIC_TITLES.get(key, key) for key in metrics]
    header += ["bytes to clients", "bytes to server", "wall time"]
    rows = [
        [str(run["method"]), str(run["task"]), str(run["model"]), str(run["num_clients"]), str(run["rounds"])]
        + [format_metric(key, run["metrics"].get(key), scores_nll(run)) for key in metrics]
        + [
            format_bytes(run["cost"].get("bytes_to_clients")),
            format_bytes(run["cost"].get("bytes_to_server")),
            format_seconds(run["cost"].get("wall_seconds")),
        ]
        for run in runs
    ]
    return markdown_table(header, rows)


def round_scope(run: dict[str, Any]) -> list[str]:
    """A line saying so when the rounds before the last were scored on fewer examples than the last."""
    settings = run.get("config", {}).get("eval", {})
    subset, limit = settings.get("round_limit"), settings.get("limit")
    if subset is None or (limit is not None and subset >= limit):
        return []
    scope = f"all {limit}" if limit is not None else "all"
    return [f"Rounds before the last: scores on the first {subset} evaluation examples; the last round on {scope}.", ""]


def rows_table(rows: Sequence[dict[str, Any]], nll: bool = False) -> list[str]:
    """A table of history or client rows: one column per key that any row has, in order of appearance."""
    keys = list({key: None for row in rows for key in row})
    return markdown_table(keys, [[format_field(key, row.get(key), nll) for key in keys] for row in rows])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]


def scores_nll(run: dict[str, Any]) -> bool:
    """Whether a run's model rows are the test responses' mean token NLL (instruction data), not accuracies."""
    return run.get("metric") == "response_nll"


def format_metric(key: str, value: float | None, nll: bool = False) -> str:
    """Metrics are accuracies (shown as %) unless their name or value says otherwise (a loss, perplexity);
    with `nll` the model rows are mean token negative log-likelihoods (nats, lower is better)."""
    if value is None:
        return MISSING
    difference = key.endswith(("_gain", "_gap"))
    if nll and (key in ACCURACY_KEYS or difference):
        return f"{value:+.3f} nats/token" if difference else f"{value:.3f} nats/token"
    if difference:  # a difference of two accuracies
        return f"{100 * value:+.1f} points"
    if key in ACCURACY_KEYS or (0 <= value <= 1 and not any(word in key for word in NOT_ACCURACY_WORDS)):
        return format_accuracy(value)
    return format_number(value)


def format_field(key: str, value: Any, nll: bool = False) -> str:
    """Format a history/client field by what its key says it holds (`nll`: model rows are NLLs)."""
    if nll and key in ACCURACY_KEYS:
        return format_metric(key, value, nll)
    if key in ACCURACY_KEYS or "acc" in key:
        return format_accuracy(value)
    if key.startswith("bytes"):
        return format_bytes(value)
    return format_number(value)


def format_accuracy(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def format_bytes(value: float | None) -> str:
    if value is None:
        return MISSING
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    size, unit = float(value), 0
    while abs(size) >= 1024 and unit < len(units) - 1:
        size /= 1024
        unit += 1
    return f"{int(size)} B" if unit == 0 else f"{size:.1f} {units[unit]}"


def format_seconds(value: float | None) -> str:
    if value is None:
        return MISSING
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_number(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_accuracy_per_round(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Plug-in accuracy by round, one line per run, and LLM zero-shot accuracy as dashed lines."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    zero_shots = [run["metrics"].get("llm_zero_shot") for run in runs]
    shared_zero_shot = len(set(zero_shots)) == 1  # one model for all runs: draw its line once
    for label, run, zero_shot in zip(labels, runs, zero_shots, strict=True):
        points = [
            (row["round"], 100 * row["plugin"]) for row in run.get("history", []) if row.get("plugin") is not None
        ]
        (line,) = axes.plot([r for r, _ in points], [a for _, a in points], marker="o", label=label)
        if zero_shot is not None and not shared_zero_shot:
            axes.axhline(100 * zero_shot, color=line.get_color(), linestyle="--", label=f"{label}: LLM zero-shot")
    if shared_zero_shot and zero_shots[0] is not None:
        axes.axhline(100 * zero_shots[0], color="grey", linestyle="--", label="LLM zero-shot")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("plug-in accuracy (%)")
    axes.set_title("Plug-in accuracy per round")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_bytes_per_run(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Bytes sent each way per run, on a log scale: methods differ by orders of magnitude."""
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(runs)), 4.5))
    positions = range(len(runs))
    width = 0.4
    for offset, key, name in (
        (-width / 2, "bytes_to_clients", "to clients"),
        (width / 2, "bytes_to_server", "to server"),
    ):
        values = [run["cost"].get(key) or 0 for run in runs]
        bars = axes.bar([p + offset for p in positions], values, width, label=name)
        axes.bar_label(bars, labels=[format_bytes(v) for v in values], fontsize="x-small")
    axes.set_xticks(list(positions), labels, rotation=15, ha="right")
    axes.set_yscale("log")
    axes.set_ylabel("bytes")
    axes.set_title("Communication per run")
    axes.legend(loc="upper left", bbox_to_anchor=(1, 1))  # outside: inside it would hide the tallest bar
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)  # figures otherwise stay alive in pyplot's registry
    return path


# ---- comparisons across methods (used by the benchmark suite) ---------------------------------


def capability_leakage(run: dict[str, Any]) -> float | None:
    """CPL: emulator zero-shot / LLM zero-shot accuracy x 100 (what a client can do with what it was given,
    relative to the LLM; lower = the hand-out is a worse substitute for the LLM). None if either is missing."""
    metrics = run["metrics"]
    llm, emulator = metrics.get("llm_zero_shot"), metrics.get("emulator_zero_shot")
    if llm is None or emulator is None or llm <= 0:
        return None
    return 100 * emulator / llm


def bytes_per_round(run: dict[str, Any]) -> dict[str, float | None]:
    """Per client: the one-off hand-out (setup), and the mean bytes per round each way."""
    clients = max(1, int(run.get("num_clients") or 1))
    history = run.get("history") or []
    to_clients = [row["bytes_to_clients"] for row in history if row.get("bytes_to_clients") is not None]
    to_server = [row["bytes_to_server"] for row in history if row.get("bytes_to_server") is not None]
    total_to_clients = run["cost"].get("bytes_to_clients")
    setup = None if total_to_clients is None else (total_to_clients - sum(to_clients)) / clients
    return {
        "setup_to_each_client": setup,
        "round_to_each_client": sum(to_clients) / len(to_clients) / clients if to_clients else None,
        "round_from_each_client": sum(to_server) / len(to_server) / clients if to_server else None,
    }


def bytes_table(
    runs: Sequence[dict[str, Any]], labels: Sequence[str], full_model_bytes: float | None = None
) -> list[str]:
    """Communication per run: what each client receives once, then per round each way, next to the LLM's size."""
    header = ["run", "hand-out to each client (once)", "per round to each client", "per round from each client"]
    if full_model_bytes:
        header += ["full model", "per round from each client / full model"]
    rows = []
    for label, run in zip(labels, runs, strict=True):
        sizes = bytes_per_round(run)
        row = [
            label,
            format_bytes(sizes["setup_to_each_client"]),
            format_bytes(sizes["round_to_each_client"]),
            format_bytes(sizes["round_from_each_client"]),
        ]
        if full_model_bytes:
            upload = sizes["round_from_each_client"]
            row += [format_bytes(full_model_bytes), MISSING if upload is None else f"{upload / full_model_bytes:.2%}"]
        rows.append(row)
    return markdown_table(header, rows)


def accuracy_interval(accuracy: float, examples: int, confidence: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of an accuracy over `examples` scored test examples (percentile method)."""
    correct = round(accuracy * examples)
    outcomes = np.zeros(max(examples, 1))
    outcomes[:correct] = 1.0
    if correct in (0, examples):
        return accuracy, accuracy
    result = scipy.stats.bootstrap(
        (outcomes,),
        np.mean,
        n_resamples=2000,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(0),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def scored_examples(run: dict[str, Any]) -> int:
    """How many test examples the run scored (its eval.limit, at most the task's test split)."""
    return int(run.get("config", {}).get("eval", {}).get("limit") or 0)


def plot_utility_vs_privacy(runs: Sequence[dict[str, Any]], path: Path, chance: dict[str, float] | None = None) -> Path:
    """One panel per task: the hand-out's capability retained (x) against the plug-in's gain over the
    LLM's zero-shot (y, points, with 95% bootstrap intervals), the centralised gain as a dashed line.

    Good methods sit top-left: a large gain once the adapter is plugged in, little of the LLM's
    capability in the hand-out on its own. `chance`: per task, the accuracy of guessing (0 if absent).
    """
    chance = chance or {}
    tasks = list({str(run["task"]): None for run in runs})
    methods = list({str(run["method"]): None for run in runs})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, panels = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 4), squeeze=False)
    for axes, task in zip(panels[0], tasks or [""], strict=True):
        centralised = []
        for run in (r for r in runs if str(r["task"]) == task):
            metrics = run["metrics"]
            llm, plugin, hand_out = (
                metrics.get("llm_zero_shot"),
                metrics.get("plugin"),
                metrics.get("emulator_zero_shot"),
            )
            if metrics.get("centralized") is not None and llm is not None:
                centralised.append(100 * (metrics["centralized"] - llm))
            if llm is None or plugin is None or hand_out is None:
                continue
            x = capability_retained(hand_out, llm, chance.get(task, 0.0))
            if x is None:
                continue
            low, high = accuracy_interval(plugin, scored_examples(run) or 1)
            gain = 100 * (plugin - llm)
            method = str(run["method"])
            axes.errorbar(
                x,
                gain,
                yerr=[[gain - 100 * (low - llm)], [100 * (high - llm) - gain]],
                fmt="o",
                capsize=3,
                color=colors[methods.index(method) % len(colors)],
            )
            axes.annotate(method, (x, gain), textcoords="offset points", xytext=(4, 4), fontsize="small")
        if centralised:
            level = sum(centralised) / len(centralised)
            axes.axhline(level, linestyle="--", color="grey")
            axes.text(0.02, level, " centralised", va="bottom", fontsize="small", transform=axes.get_yaxis_transform())
        axes.axhline(0, color="black", linewidth=0.5)
        axes.set_title(task, fontsize="medium")
        axes.set_xlabel("hand-out capability retained (above chance)")
        axes.set_ylabel("plug-in gain over LLM zero-shot (points)")
        axes.grid(alpha=0.3)
    figure.tight_layout()  # keeps every label inside the figure
    return _save(figure, path)
