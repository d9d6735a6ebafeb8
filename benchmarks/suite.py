"""The benchmark suite: one utility table over tasks and methods, throughput, scale and communication.

    python -m benchmarks.suite --quick            # 2 CPU cores (target: under 45 minutes)
    python -m benchmarks.suite                    # full budget, a larger machine
    python -m benchmarks.suite --quick --parts utility --tasks piqa --methods offsite

Parts (`--parts`, default all):
- throughput: blindtune's training loop vs a bare PyTorch + peft loop (`benchmarks.throughput`);
- scale: 2..100 simulated clients on a tiny model (`benchmarks.scale`);
- utility: for every task, method and seed one `run_experiment` (baselines on for the reference
  method), giving LLM / emulator zero-shot, each method's plug-in, centralised LoRA (upper bound)
  and local-only (lower bound) with the same number of examples seen; the per-round overhead of
  the federation layer and the bytes each way come from the same runs.

Everything is written under `--out` (default benchmarks/results/<budget>/): `suite.json` (all figures),
`report.md` (the page), its plots, `runs/<task>/<method>/seed<k>/` (each run's results.json,
report.md, config.json) and `runs/report.md` (every run's rounds and clients in detail). A run whose
results.json exists with the same config is reused (`--fresh` reruns it), so an interrupted suite
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import federation_overhead, machine, pick_device, timed_exchanges

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # research configs: overrides of the product configs
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTS = ("throughput", "scale", "utility")
REFERENCE_METHOD = "offsite"  # its centralised row is "centralised LoRA on the pooled data"
GENERATION_TASKS_NOTE = "no method selected runs generation tasks (GSM8K needs a rationale-based method: fedcot)"


@dataclass
class Budget:
    """What one budget runs. `baselines`: `reference` (centralised + local-only for REFERENCE_METHOD
    only) or `all` (for every method)."""

    name: str
    tasks: list[str]
    seeds: list[int]
    baselines: str
    throughput: dict[str, int]
    scale: dict[str, list[int]]
    notes: list[str] = field(default_factory=list)
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # merged into every run of a task


BUDGETS = {
    "quick": Budget(
        name="quick",
        tasks=["wordnet-supersense", "wordnet-verb-supersense", "piqa", "gsm8k"],
        seeds=[0],
        baselines="reference",
        throughput={"steps": 2, "repeats": 8},
        scale={"clients": [2, 8, 32, 100], "simulation_clients": [8]},
        notes=[
            "1 seed; 3 clients x 2 rounds x 4 steps x 8 examples; 200 test examples per task; in-process engine "
            "(same apps and records as Flower's simulation engine, without Ray's start-up); LLEOT's emulator "
            "prepared in 20 + 20 steps, its soft prompt at lr 0.01; FedProxy's proxy compressed as its acceptance "
            "config's but distilled in 30 steps; FedMKT 16 public examples, 4 + 3 distillation steps; FedCoT 8 "
            "privatised prompts per client (epsilon 50 per private token, adaptive), 24-token rationales, the "
            "only method on GSM8K (200 test questions, answers of at most 128 generated tokens); baselines for "
            "offsite only; PubMedQA only in the full budget.",
        ],
    ),
    "full": Budget(
        name="full",
        tasks=["wordnet-supersense", "wordnet-verb-supersense", "piqa", "pubmedqa", "gsm8k"],
        seeds=[0, 1],
        baselines="all",
        throughput={"steps": 8, "repeats": 8},
        scale={"clients": [2, 8, 32, 100], "simulation_clients": [2, 8, 32]},
        notes=[
            "2 seeds; 3 clients x 4 rounds x 30 steps x 8 examples (the demo's budget); 500 test examples; "
            "Flower's simulation engine; every method with both baselines.",
        ],
    ),
}


# ---- utility runs ------------------------------------------------------------------------------


def base_config(budget: str, method: str) -> dict[str, Any]:
    """benchmarks/configs/bench_<method>_<budget>.yaml, else bench_<budget>.yaml with the method swapped in
    (each a product config of blindtune/configs/ with the budget's changes, resolved here)."""
    from blindtune.config import load_config_data

    own = CONFIG_DIR / f"bench_{method}_{budget}.yaml"
    if own.is_file():
        data = load_config_data(own)
        if data.get("method") != method:
            raise ValueError(f"{own} is for method {data.get('method')!r}, not {method!r}")
        return data
    data = load_config_data(CONFIG_DIR / f"bench_{budget}.yaml")
    data.pop(data["method"], None)
    # The server step is tuned per method (offsite's demo steps 2x); another method starts from FedAvg's.
    data.get("federation", {}).pop("server_learning_rate", None)
    data["method"] = method
    return data


def method_task_kinds(method_name: str) -> set[str]:
    """Task kinds a method is benchmarked on (its `task_kinds`)."""
    from blindtune.methods import get_method

    return {str(kind) for kind in get_method(method_name).task_kinds}


def method_result_name(method_name: str) -> str:
    """What a method's `metrics.plugin` measures (its `result_name`: `plug-in`, the adapted LLM, by default)."""
    from blindtune.methods import get_method

    return get_method(method_name).result_name


def task_status(task: str) -> tuple[str | None, str | None]:
    """(kind, None) when the task loads here, else (None, why not)."""
    from blindtune.data import load_task

    try:
        return str(load_task(task).kind), None
    except Exception as error:  # missing files, missing WordNet: the task has not landed on this machine
        return None, f"{type(error).__name__}: {error}"


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_one(
    budget: str,
    task: str,
    method: str,
    seed: int,
    baselines: bool,
    run_dir: Path,
    fresh: bool,
    progress: bool,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One experiment (or its results from an earlier suite run with the same config)."""
    from blindtune.config import merge
    from blindtune.methods import run_config_from_dict
    from blindtune.runner import run_experiment

    data = merge(
        base_config(budget, method),
        {"task": task, "seed": seed, "baselines": {"centralized": baselines, "local_only": baselines}}
        | (overrides or {}),
    )
    config = run_config_from_dict(data)
    entry: dict[str, Any] = {"task": task, "method": method, "seed": seed, "dir": str(run_dir)}
    print(f"[suite] {task} / {method} / seed {seed}", flush=True)
    results_file, config_file, timing_file = run_dir / "results.json", run_dir / "config.json", run_dir / "timing.json"
    if (
        not fresh
        and results_file.is_file()
        and timing_file.is_file()
        and json.loads(config_file.read_text()) == config.to_dict()
    ):
        return {**entry, "status": "reused", **json.loads(timing_file.read_text())}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    try:
        with timed_exchanges() as timings:
            results = run_experiment(config, run_dir, progress=progress)
    except Exception as error:
        entry.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        (run_dir / "error.txt").write_text(entry["traceback"])
        return entry
    finally:
        # The clients' copies of the emulator and the round checkpoints are large and reproducible.
        for bulky in ("clients", "checkpoints"):
            shutil.rmtree(run_dir / bulky, ignore_errors=True)
    parallelism = 2 if config.federation.engine.value == "simulation" else 1
    timing = {
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": cpu_seconds() - cpu_started,
        "torch_threads": torch_threads(),
        "federation": federation_overhead(timings, results["clients"], parallelism),
    }
    timing_file.write_text(json.dumps(timing, indent=2))
    return {**entry, "status": "ran", **timing}


def _init_worker(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def committed_run_seconds(budget: str) -> dict[tuple[str, str], float]:
    """(task, method) -> wall seconds its seed-0 run took in the committed results of `budget` (if any)."""
    file = RESULTS_DIR / budget / "suite.json"
    runs = json.loads(file.read_text()).get("utility", {}).get("runs", []) if file.is_file() else []
    return {(e["task"], e["method"]): e["wall_seconds"] for e in runs if e.get("seed") == 0 and "wall_seconds" in e}


def run_utility(
    budget: Budget,
    methods: Sequence[str],
    tasks: Sequence[str],
    out: Path,
    fresh: bool,
    progress: bool,
    overrides: dict[str, Any] | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Every (task, method, seed) run; `jobs` > 1 runs that many at once, each in its own process (on a
    small CPU machine two single-threaded runs use the cores better than one run with two threads)."""
    from blindtune.config import merge

    tasks_info: dict[str, dict[str, Any]] = {}
    planned = []
    for task in tasks:
        kind, unavailable = task_status(task)
        runnable = [m for m in methods if kind is not None and kind in method_task_kinds(m)]
        tasks_info[task] = {"kind": kind, "unavailable": unavailable, "methods": runnable}
        for method in runnable:
            baselines = budget.baselines == "all" or method == REFERENCE_METHOD
            for seed in budget.seeds:
                run_dir = out / "runs" / task / method / f"seed{seed}"
                run_overrides = merge(budget.task_overrides.get(task, {}), overrides or {})
                planned.append((budget.name, task, method, seed, baselines, run_dir, fresh, progress, run_overrides))

    durations = committed_run_seconds(budget.name)
    # Longest first (by the committed results of this budget; runs never measured before any), so that
    # parallel workers finish together instead of one core idling through the last long run.
    planned.sort(key=lambda arguments: -durations.get((arguments[1], arguments[2]), math.inf))

    def reported(entry: dict[str, Any]) -> dict[str, Any]:
        print(
            f"[suite] {entry['task']} / {entry['method']} / seed {entry['seed']}: {entry['status']}"
            + (f" in {entry['wall_seconds']:.0f} s" if "wall_seconds" in entry else "")
            + (f" ({entry['error']})" if "error" in entry else ""),
            flush=True,
        )
        return entry

    started = time.perf_counter()
    if jobs <= 1:
        entries = [reported(run_one(*arguments)) for arguments in planned]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # no forked torch/Ray state in the workers
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = [pool.submit(run_one, *arguments) for arguments in planned]
            entries = [reported(future.result()) for future in futures]
    # Runs reused from an earlier invocation count with the wall time they took then.
    wall = time.perf_counter() - started + sum(e.get("wall_seconds", 0.0) for e in entries if e["status"] == "reused")
    return {"tasks": tasks_info, "runs": entries, "jobs": jobs, "wall_seconds": wall}


# ---- the summary table -------------------------------------------------------------------------


def mean_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def load_runs(utility: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Each run's results.json: in its recorded directory, else where it sits under `out` (a suite
    directory that was copied or committed elsewhere)."""
    runs = []
    for entry in utility["runs"]:
        file = Path(entry["dir"]) / "results.json"
        if not file.is_file():
            file = out / "runs" / entry["task"] / entry["method"] / f"seed{entry['seed']}" / "results.json"
        if entry["status"] != "failed" and file.is_file():
            run = json.loads(file.read_text())
            run["_entry"] = entry
            runs.append(run)
    return runs


def examples_seen(run: dict[str, Any]) -> int:
    config = run["config"]
    return (
        int(config["train"]["steps"])
        * int(config["train"]["batch_size"])
        * int(config["federation"]["rounds"])
        * int(config["federation"]["num_clients"])
    )


def summary_rows(utility: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, setting): accuracy mean and spread over seeds, and what it cost."""
    from blindtune.report import accuracy_interval, capability_leakage, scored_examples

    rows: list[dict[str, Any]] = []
    for task, info in utility["tasks"].items():
        if info["unavailable"]:
            rows.append({"task": task, "setting": "all settings", "note": f"task not available: {info['unavailable']}"})
            continue
        if not info["methods"]:
            note = GENERATION_TASKS_NOTE if info["kind"] == "generation" else "no method for this task kind"
            rows.append({"task": task, "setting": "all settings", "note": note})
            continue
        task_runs = [r for r in runs if r["task"] == task]
        failed = [e for e in utility["runs"] if e["task"] == task and e["status"] == "failed"]

        scored = scored_examples(task_runs[0]) if task_runs else 0

        def add(
            setting: str, values: list[float], seen: int | None, task: str = task, scored: int = scored, **extra: Any
        ) -> None:
            if not values:
                return
            mean, spread = mean_spread(values)
            # Bootstrap over the test examples of every seed pooled (each seed scores the same `scored`).
            low, high = accuracy_interval(mean, scored * len(values)) if scored else (None, None)
            rows.append(
                {"task": task, "setting": setting, "mean": mean, "spread": spread, "seeds": len(values)}
                | {"interval": [low, high] if low is not None else None}
                | ({"examples_seen": seen} if seen is not None else {})
                | extra
            )

        # The LLM is the same whichever method ran: one value per seed.
        by_seed = {
            r["config"]["seed"]: r["metrics"]["llm_zero_shot"] for r in task_runs if "llm_zero_shot" in r["metrics"]
        }
        add("LLM zero-shot", list(by_seed.values()), None)
        for method in info["methods"]:
            own = [r for r in task_runs if r["method"] == method]
            seen = examples_seen(own[0]) if own else None
            cpls = [c for r in own if (c := capability_leakage(r)) is not None]
            add(
                f"{method}: emulator zero-shot",
                [r["metrics"]["emulator_zero_shot"] for r in own if "emulator_zero_shot" in r["metrics"]],
                None,
                cpl=statistics.fmean(cpls) if cpls else None,
            )
            result_name = method_result_name(method)
            add(f"{method}: {result_name}", [r["metrics"]["plugin"] for r in own if "plugin" in r["metrics"]], seen)
        for method in info["methods"]:
            own = [r for r in task_runs if r["method"] == method]
            values = [r["metrics"]["centralized"] for r in own if "centralized" in r["metrics"]]
            name = (
                "centralised LoRA, pooled data (upper bound)"
                if method == REFERENCE_METHOD
                else f"{method}: centralised, pooled data"
            )
            add(name, values, examples_seen(own[0]) if own else None)
        for method in info["methods"]:
            own = [r for r in task_runs if r["method"] == method]
            values = [r["metrics"]["local_only"] for r in own if "local_only" in r["metrics"]]
            add(f"{method}: local only, client 0 (lower bound)", values, examples_seen(own[0]) if own else None)
        for entry in failed:
            rows.append(
                {
                    "task": task,
                    "setting": f"{entry['method']} seed {entry['seed']}",
                    "note": f"failed: {entry['error']}",
                }
            )
    return rows


def chance_levels(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per task: the accuracy of guessing (mean of 1 / options over its test split; 0 for generation)."""
    from blindtune.data import load_task

    levels = {}
    for task in {str(run["task"]) for run in runs}:
        try:
            test = load_task(task).test
        except (OSError, ValueError):  # a task whose data is not here: no chance correction
            levels[task] = 0.0
            continue
        options = [len(example.choices) for example in test if example.choices]
        levels[task] = sum(1 / n for n in options) / len(test) if options else 0.0
    return levels


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    from blindtune.report import markdown_table

    header = ["task", "setting", "accuracy", "95% interval", "vs LLM zero-shot", "seeds", "examples seen", "CPL"]
    lines = []
    llm = {row["task"]: row.get("interval") for row in rows if row.get("setting") == "LLM zero-shot"}
    for row in rows:
        if "note" in row:
            lines.append([row["task"], row["setting"], row["note"], "", "", "", "", ""])
            continue
        accuracy = f"{100 * row['mean']:.1f}%"
        if row["spread"] is not None:
            accuracy += f" ± {100 * row['spread']:.1f}"
        interval = row.get("interval")
        reference = llm.get(row["task"])
        if row["setting"] == "LLM zero-shot" or not interval or not reference:
            versus = ""
        elif interval[0] <= reference[1] and reference[0] <= interval[1]:
            versus = "within noise"
        else:
            versus = "above" if row["mean"] > (reference[0] + reference[1]) / 2 else "below"
        lines.append(
            [
                row["task"],
                row["setting"],
                accuracy,
                f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f}" if interval else "",
                versus,
                str(row["seeds"]),
                f"{row['examples_seen']:,}" if row.get("examples_seen") else "",
                f"{row['cpl']:.0f}" if row.get("cpl") is not None else "",
            ]
        )
    return markdown_table(header, lines)


def overhead_table(runs: list[dict[str, Any]]) -> list[str]:
    from blindtune.report import format_seconds, markdown_table

    rows = []
    for run in runs:
        entry = run["_entry"]
        federation = entry.get("federation") or {}
        rounds = federation.get("rounds") or []
        if not rounds:
            continue

        def mean(key: str, rounds: list[dict[str, Any]] = rounds) -> float:
            return statistics.fmean(r[key] for r in rounds)

        rows.append(
            [
                f"{run['method']} ({run['task']}, seed {run['config']['seed']})",
                run["config"]["federation"]["engine"],
                format_seconds(federation.get("setup_seconds")),
                format_seconds(mean("round_seconds")),
                format_seconds(mean("client_train_seconds")),
                format_seconds(mean("overhead_seconds")),
                f"{mean('overhead_seconds') / mean('round_seconds'):.0%}",
                format_seconds(entry.get("wall_seconds")),
            ]
        )
    header = ["run", "engine", "hand-out", "round wall", "client training", "overhead", "overhead share", "run wall"]
    return markdown_table(header, rows)


def full_model_bytes(model: str) -> int:
    """The LLM's size as the server holds it (unique parameters and buffers, as stored)."""
    from blindtune.models import load_model

    loaded = load_model(model)
    tensors = {id(t): t for t in [*loaded.model.parameters(), *loaded.model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- the page ----------------------------------------------------------------------------------


def write_page(suite: dict[str, Any], out: Path) -> Path:
    from blindtune.report import (
        MISSING,
        bytes_table,
        format_bytes,
        format_seconds,
        markdown_table,
        plot_utility_vs_privacy,
        write_report,
    )

    budget = suite["budget"]
    lines = [
        f"# blindtune benchmark suite ({budget['name']} budget)",
        "",
        f"Measured {suite['started']} with `{suite['command']}` on {suite['machine']['cpu_count']} CPU cores"
        + (f" and {suite['machine']['cuda']}" if suite["machine"].get("cuda") else "")
        + f" (load average at the end: {suite['machine'].get('load_average_1_5_15')}).",
        f"Suite wall time {format_seconds(suite['wall_seconds'])}, CPU time {format_seconds(suite['cpu_seconds'])} "
        "(sum of the parts below, which may come from several invocations in this directory):",
        "",
        *markdown_table(
            ["part", "wall time", "CPU time", "torch threads"],
            [
                [
                    part,
                    format_seconds(timing.get("wall_seconds")),
                    format_seconds(timing.get("cpu_seconds")),
                    str(timing.get("torch_threads", MISSING)),
                ]
                for part, timing in suite.get("part_timings", {}).items()
            ],
        ),
        "",
        *[f"- {note}" for note in budget["notes"]],
        *[f"- {note}" for note in suite.get("notes", [])],
    ]
    utility = suite.get("utility")
    runs = load_runs(utility, out) if utility else []
    if utility:
        lines += [
            "",
            "## Utility",
            "",
            "Accuracy on each task's test split (mean ± standard deviation over seeds), with a 95% bootstrap "
            "interval over the test examples (all seeds pooled); a row whose interval overlaps the LLM zero-shot "
            'row\'s is "within noise" of it. Trained rows see the same number of examples. CPL (capability '
            "leakage) = emulator zero-shot / LLM zero-shot x 100: how much of the LLM's ability the hand-out "
            "carries on its own (lower = more private). The plot: one panel per task, x = the hand-out's "
            "capability retained above chance, y = plug-in gain over the LLM's zero-shot with its 95% interval.",
            "",
            *summary_table(suite["summary"]),
        ]
        if runs:
            plot_utility_vs_privacy(runs, out / "utility_vs_privacy.png", chance_levels(runs))
            labels = [f"{r['method']} ({r['task']}, seed {r['config']['seed']})" for r in runs]
            write_report(runs_without_entry(runs), out / "runs", title="blindtune benchmark runs in detail")
            lines += [
                "",
                "![utility vs capability privacy](utility_vs_privacy.png)",
                "",
                "Every run's rounds and clients: [runs/report.md](runs/report.md).",
                "",
                "## Communication",
                "",
                f"Bytes per client: the one-off hand-out (the emulator), then per round each way, next to the full "
                f"LLM ({format_bytes(suite.get('full_model_bytes'))}).",
                "",
                *bytes_table(runs, labels, suite.get("full_model_bytes")),
                "",
                "## Federation overhead per round",
                "",
                "Round wall time (server sends the global adapter, every client rebuilds its model from its work "
                "directory, trains and replies) minus the clients' training time: what messaging, serialisation "
                "and client set-up cost.",
                "",
                *overhead_table(runs),
            ]
    throughput = suite.get("throughput")
    if throughput and "error" not in throughput:
        ok = throughput["ratio"] >= 0.9
        lines += [
            "",
            "## Training throughput",
            "",
            f"{throughput['adapter']} on the {throughput['emulator_layers']}-layer emulator, batch "
            f"{throughput['batch_size']}, max length {throughput['max_length']}, {throughput['steps_per_measurement']} "
            f"steps per measurement, {throughput['repeats']} alternating pairs, device {throughput['device']}. "
            f"Same first-step loss in both loops: {throughput['same_first_step_loss']}.",
            "",
            *markdown_table(
                ["loop", "tokens/s (best of the repeats)"],
                [
                    ["blindtune `train`", f"{throughput['blindtune_tokens_per_second']:.1f}"],
                    ["bare PyTorch + peft", f"{throughput['bare_tokens_per_second']:.1f}"],
                    ["**ratio blindtune / bare**", f"**{throughput['ratio']:.2f}**"],
                    [
                        "ratio, median of adjacent pairs (range)",
                        f"{throughput['ratio_median_pairs']:.2f} ({throughput['ratio_min']:.2f} to "
                        f"{throughput['ratio_max']:.2f})",
                    ],
                    ["ratio in CPU time (median of pairs)", f"{throughput['ratio_cpu']:.2f}"],
                ],
            ),
            "",
            "The ratio is at least 0.9." if ok else "The ratio is below 0.9: see the profile in suite.json.",
        ]
    elif throughput:
        lines += ["", "## Training throughput", "", f"Failed: {throughput['error']}"]
    scale = suite.get("scale")
    if scale and "error" not in scale:
        from benchmarks.scale import plot_scale, scale_table

        plot_scale(scale, out / "scale.png")
        check = scale["resident_clients_check"]
        lines += [
            "",
            "## Scale",
            "",
            f"{scale['setting']}; {scale['model']}. Peak memory = sampled resident memory of the run's process "
            "tree (Ray's workers included); per added client = least-squares slope.",
            "",
            *scale_table(scale),
            "",
            "![scale](scale.png)",
            "",
            f"Clients resident at once: {check['clients_resident_at_once']} (peak memory grows "
            f"{format_bytes(check['peak_rss_bytes_per_client'])} per client; one client's emulator is "
            f"{format_bytes(check['one_client_emulator_bytes'])}).",
        ]
    elif scale:
        lines += ["", "## Scale", "", f"Failed: {scale['error']}"]
    page = out / "report.md"
    page.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return page


def runs_without_entry(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in run.items() if k != "_entry"} for run in runs]


# ---- main --------------------------------------------------------------------------------------


def merge_utility(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Runs of an earlier suite invocation in the same directory stay unless rerun now."""
    if not previous:
        return new
    key = lambda entry: (entry["task"], entry["method"], entry["seed"])  # noqa: E731
    rerun = {key(entry) for entry in new["runs"]}
    kept = [e for e in previous["runs"] if key(e) not in rerun]
    tasks = {**previous["tasks"], **new["tasks"]}
    # A subset rerun (--methods) must not hide the task's other methods from the page.
    for task, info in new["tasks"].items():
        earlier = previous["tasks"].get(task, {}).get("methods", [])
        tasks[task] = {**info, "methods": [*earlier, *(m for m in info.get("methods", []) if m not in earlier)]}
    return {
        **new,
        "tasks": tasks,
        "runs": kept + new["runs"],
        "wall_seconds": new.get("wall_seconds", 0.0) + sum(e.get("wall_seconds", 0.0) for e in kept),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="blindtune benchmark suite")
    parser.add_argument("--quick", action="store_true", help="the 2-core budget (target: under 45 minutes)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<budget>")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--tasks", nargs="+", default=None, help="default: the budget's tasks")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--model", default=None, help="another model for the utility runs (default: the config's)")
    parser.add_argument("--device", default=None, help="cpu or cuda for every part (default: cuda when present)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for this process and its children (default: torch's own choice, all cores); "
        "on a machine shared with other jobs 1 is much faster",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="utility runs at once, each in its own process (default: one per core when --threads is 1, else 1)",
    )
    parser.add_argument("--fresh", action="store_true", help="rerun runs whose results already exist")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from blindtune.methods import method_names

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the scale points' processes
    budget = BUDGETS["quick" if args.quick else "full"]
    out = args.out or RESULTS_DIR / budget.name
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods or method_names()
    tasks = args.tasks or budget.tasks
    suite_file = out / "suite.json"
    previous = json.loads(suite_file.read_text()) if suite_file.is_file() else {}
    if previous.get("budget", {}).get("name") not in (None, budget.name):
        raise SystemExit(f"{out} holds a {previous['budget']['name']} suite; pass another --out")
    device = pick_device(args.device)
    command = "python -m benchmarks.suite " + " ".join(sys.argv[1:] if argv is None else argv)
    suite: dict[str, Any] = {
        "budget": budget.__dict__,
        "command": command,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "threads": args.threads,
        "methods": sorted(set(methods) | set(previous.get("methods", []))),
        "part_timings": previous.get("part_timings", {}),
        "invocations": [*previous.get("invocations", []), command],
        "notes": [],
    }
    # Parts not run this time keep their figures from the earlier invocation in `out`.
    for part in ("throughput", "scale", "utility", "full_model_bytes"):
        if part in previous:
            suite[part] = previous[part]
    # The utility runs compute where the throughput part does (config `device`).
    overrides: dict[str, Any] = {"device": device.type} | ({"model": args.model} if args.model else {})

    def save() -> None:
        timings = suite["part_timings"]
        utility_runs = suite.get("utility", {}).get("runs", [])
        # Measured, not summed over runs: with --jobs runs overlap (see run_utility and merge_utility).
        timings["utility"] = {
            "wall_seconds": suite.get("utility", {}).get("wall_seconds", 0.0),
            "cpu_seconds": sum(e.get("cpu_seconds", 0.0) for e in utility_runs),
            "torch_threads": ", ".join(sorted({str(e["torch_threads"]) for e in utility_runs if "torch_threads" in e})),
        }
        suite["wall_seconds"] = sum(t["wall_seconds"] for t in timings.values())
        suite["cpu_seconds"] = sum(t["cpu_seconds"] for t in timings.values())
        suite["machine"] = machine()
        suite_file.write_text(json.dumps(suite, indent=2, default=str))

    def timed(part: str, measure: Any) -> None:
        print(f"[suite] {part}", flush=True)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        try:
            suite[part] = measure()
        except Exception as error:
            suite[part] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        suite["part_timings"][part] = {
            "wall_seconds": time.perf_counter() - started,
            "cpu_seconds": cpu_seconds() - cpu_started,
            "torch_threads": torch_threads(),
        }
        save()

    if "throughput" in args.parts:
        from benchmarks.throughput import measure_throughput

        timed("throughput", lambda: measure_throughput(device=str(device), **budget.throughput))
    if "scale" in args.parts:
        from benchmarks.scale import measure_scale

        timed("scale", lambda: measure_scale(**budget.scale))
    if "utility" in args.parts:
        seen = {m: examples_seen({"config": base_config(budget.name, m)}) for m in methods}
        if len(set(seen.values())) > 1:
            suite["notes"].append(f"trained rows see different numbers of examples per method: {seen}")
        jobs = args.jobs or ((os.cpu_count() or 1) if args.threads == 1 else 1)
        new = run_utility(budget, methods, tasks, out, args.fresh, not args.no_progress, overrides, jobs, args.threads)
        suite["utility"] = merge_utility(previous.get("utility"), new)
        save()
    if "utility" in suite:
        runs = load_runs(suite["utility"], out)
        suite["summary"] = summary_rows(suite["utility"], runs)
        if runs and "full_model_bytes" not in suite:
            suite["full_model_bytes"] = full_model_bytes(runs[0]["model"])
    save()
    page = write_page(suite, out)
    print(f"[suite] wrote {page} and {suite_file}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
