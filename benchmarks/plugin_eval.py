"""Plug-in accuracy of finished runs on more test examples than the runs scored.

    python -m benchmarks.plugin_eval runs/lleot-keep2-sp runs/offsite-distilled-keep2-sp --limit 1000

A run scores its plug-in on `eval.limit` test examples (200 in the quick configs, so one example is
half a point): too few to tell adapters a few points apart. This takes each run's final global adapter
(its last checkpoint), plugs it into the LLM the way the run's server does, and scores the first
`--limit` test examples of the run's task, which begin with the run's own. Beside each accuracy: the
LLM's zero-shot accuracy on the same examples, and a 95% interval (normal approximation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from blindtune.audits.audit import final_adapter, plugged_final_adapter
from blindtune.config import RunConfig
from blindtune.data import load_task
from blindtune.methods import run_config_from_dict
from blindtune.models import load_model
from blindtune.models.loading import LoadedModel


def interval(accuracy: float, examples: int) -> float:
    """Half-width of the 95% normal-approximation interval of an accuracy over `examples` examples."""
    return 1.96 * math.sqrt(accuracy * (1 - accuracy) / examples)


def rescore(run_dir: Path, limit: int, models: dict[str, LoadedModel] | None = None) -> dict[str, Any]:
    """`models`: LLMs already loaded, by the config's model name (runs of one LLM share one load)."""
    config: RunConfig = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    task = load_task(config.task, config.data_dir, seed=config.seed)
    evaluate = dataclasses.replace(config.eval, limit=limit).evaluator(task)  # the run's scoring settings
    examples = min(limit, len(task.test))
    models = {} if models is None else models
    if config.model not in models:
        models[config.model] = load_model(config.model)
    llm = models[config.model]  # the plug-in below restores its weights on exit
    llm_accuracy = evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True)
    plugged = plugged_final_adapter(config, llm, final_adapter(run_dir))
    if plugged is None:
        raise ValueError(f"{run_dir}: method {config.method!r} plugs no adapter into the LLM")
    with plugged as adapted:
        plugin = evaluate(adapted, llm.tokenizer, f"plug-in {run_dir.name}")
    recorded = json.loads((run_dir / "results.json").read_text())["metrics"]["plugin"]
    return {
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
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (with checkpoints/)")
    parser.add_argument("--limit", type=int, default=1000, help="test examples to score")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plugin-eval"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    models: dict[str, LoadedModel] = {}
    for run_dir in args.runs:
        rows.append(rescore(run_dir, args.limit, models))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plugin_eval.json").write_text(json.dumps(rows, indent=2))
    (args.out / "report.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
