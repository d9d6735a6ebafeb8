"""Plug-in accuracy of finished runs on more test examples than the runs scored, and paired differences.

    python -m benchmarks.plugin_eval runs/lleot-keep2-sp runs/offsite-distilled-keep2-sp --limit 1000

A run scores its plug-in on `eval.limit` test examples (200 in the quick configs, so one example is
half a point): too few to tell adapters a few points apart. This takes each run's final global adapter
(its last checkpoint), plugs it into the LLM the way the run's server does, and scores the first
`--limit` test examples of the run's task, which begin with the run's own. Beside each accuracy: the
LLM's zero-shot accuracy on the same examples, and a 95% interval (normal approximation).

Runs of one task are scored on the same examples, so they are also compared in pairs (tasks scored
right or wrong, not instruction data): each run's plug-in minus the LLM's zero-shot, and minus the
first run given for that task, with 95% bootstrap intervals over the examples resampled in pairs: much
narrower than two separate intervals when the two models get most examples equally right.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from blindtune.audits.audit import final_adapter, plugged_final_adapter
from blindtune.config import RunConfig
from blindtune.data import TaskKind, load_task
from blindtune.methods import run_config_from_dict
from blindtune.models import load_model
from blindtune.models.loading import LoadedModel


def interval(accuracy: float, examples: int) -> float:
    """Half-width of the 95% normal-approximation interval of an accuracy over `examples` examples."""
    return 1.96 * math.sqrt(accuracy * (1 - accuracy) / examples)


def rescore(
    run_dir: Path,
    limit: int,
    models: dict[str, LoadedModel] | None = None,
    llm_scores: dict[tuple[str, str, int], list[bool]] | None = None,
) -> dict[str, Any]:
    """`models`: LLMs already loaded, by the config's model name (runs of one LLM share one load);
    `llm_scores`: the LLM's right or wrong per example, by (model, task, examples), filled as scored."""
    config: RunConfig = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    task = load_task(config.task, config.data_dir, seed=config.seed)
    evaluate = dataclasses.replace(config.eval, limit=limit).evaluator(task)  # the run's scoring settings
    examples = min(limit, len(task.test))
    models = {} if models is None else models
    llm_scores = {} if llm_scores is None else llm_scores
    if config.model not in models:
        models[config.model] = load_model(config.model)
    llm = models[config.model]  # the plug-in below restores its weights on exit
    plugged = plugged_final_adapter(config, llm, final_adapter(run_dir))
    if plugged is None:
        raise ValueError(f"{run_dir}: method {config.method!r} plugs no adapter into the LLM")
    key = (config.model, config.task, examples)
    correct: list[bool] | None = None
    if task.kind is not TaskKind.INSTRUCTION:  # instruction data is one NLL, not right or wrong per example
        if key not in llm_scores:
            llm_scores[key] = evaluate.correct(llm.model, llm.tokenizer, "LLM zero-shot")
        llm_accuracy = float(np.mean(llm_scores[key]))
        with plugged as adapted:
            correct = evaluate.correct(adapted, llm.tokenizer, f"plug-in {run_dir.name}")
        plugin = float(np.mean(correct))
    else:
        llm_accuracy = evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True)
        with plugged as adapted:
            plugin = evaluate(adapted, llm.tokenizer, f"plug-in {run_dir.name}")
    recorded = json.loads((run_dir / "results.json").read_text())["metrics"]["plugin"]
    row = {
        "run": str(run_dir),
        "method": config.method,
        "task": config.task,
        "examples": examples,
        "llm_zero_shot": llm_accuracy,
        "plugin": plugin,
        "plugin_95": interval(plugin, examples),
        "run_plugin": recorded,
        "run_examples": config.eval.limit,
    }
    if correct is not None:
        row["correct"] = [int(c) for c in correct]
        row["plugin_minus_llm"] = paired_difference(correct, llm_scores[key])
    return row


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Mean of a - b over the same examples, with a 95% bootstrap interval (examples resampled in pairs)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired difference needs the same examples on both sides, got {len(a)} and {len(b)}")
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(differences.mean())
    if np.all(differences == differences[0]):  # no spread: the bootstrap has nothing to resample
        return {"difference": mean, "ci95": [mean, mean]}
    result = scipy.stats.bootstrap(
        (differences,), np.mean, n_resamples=10_000, method="percentile", random_state=np.random.default_rng(0)
    )
    return {"difference": mean, "ci95": [float(result.confidence_interval.low), float(result.confidence_interval.high)]}


def compare_in_pairs(rows: list[dict[str, Any]]) -> None:
    """Each row scored right or wrong gets its difference to the first such row of its task, in place."""
    first: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        if "correct" not in row:
            continue
        reference = first.setdefault((row["task"], row["examples"]), row)
        if reference is not row:
            row["against"] = reference["run"]
            row["plugin_minus_against"] = paired_difference(row["correct"], reference["correct"])


def _points(difference: dict[str, Any]) -> str:
    low, high = difference["ci95"]
    return f"{100 * difference['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | task | examples | LLM zero-shot | plug-in (95%) | the run's own plug-in (examples) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {Path(row['run']).name} | {row['task']} | {row['examples']} | {100 * row['llm_zero_shot']:.1f}% "
            f"| {100 * row['plugin']:.1f}% ± {100 * row['plugin_95']:.1f} "
            f"| {100 * row['run_plugin']:.1f}% ({row['run_examples']}) |"
        )
    paired = [row for row in rows if "plugin_minus_llm" in row]
    if paired:
        lines += [
            "",
            "Paired differences on the same examples, in points, with 95% bootstrap intervals:",
            "",
            "| run | task | plug-in - LLM zero-shot | plug-in - the task's first run (that run) |",
            "| --- | --- | --- | --- |",
        ]
        for row in paired:
            against = (
                f"{_points(row['plugin_minus_against'])} ({Path(row['against']).name})" if "against" in row else "-"
            )
            run = Path(row["run"]).name
            lines.append(f"| {run} | {row['task']} | {_points(row['plugin_minus_llm'])} | {against} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (with checkpoints/)")
    parser.add_argument("--limit", type=int, default=1000, help="test examples to score")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plugin-eval"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    models: dict[str, LoadedModel] = {}
    llm_scores: dict[tuple[str, str, int], list[bool]] = {}
    for run_dir in args.runs:
        rows.append(rescore(run_dir, args.limit, models, llm_scores))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "correct"}), flush=True)
    compare_in_pairs(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plugin_eval.json").write_text(json.dumps(rows, indent=2))
    (args.out / "report.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
