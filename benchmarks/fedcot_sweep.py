"""FedCoT's privacy-utility curve: one run per privatisation epsilon, a JSON table, a Markdown table and a plot.

    python -m benchmarks.fedcot_sweep blindtune/configs/fedcot_wordnet_3clients.yaml \\
        --epsilons 10,50,inf --set privacy.dp.enabled=true --set privacy.dp.target_epsilon=8 \\
        --set fedcot.label_only_baseline=false --out runs/fedcot-sweep

Each epsilon is a full run (`DIR/eps-<epsilon>/results.json`); the label-only pass and the reference
baselines, which do not depend on epsilon, run with the first epsilon only. A run already finished in
DIR with the same config is reused, so an interrupted or extended sweep only runs what is missing.
A row holds the client SLM's accuracy after FedCoT training, the per-record epsilon (privatised
prompt + LoRA channel), the budget spent per token and per prompt, the share of private tokens the
mechanism left unchanged (all nearest-neighbour inversion finds) and, with `--attack-prompts N`, the
top-1 recovery of the real attacker (`benchmarks.fedcot_attack`: the mechanism's likelihood times the
LLM's prior) on the first N privatised prompts of each client. `--set` overrides the config, as in
`blindtune run`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.fedcot_attack import attack_table
from blindtune.config import RunConfig, merge, parse_settings
from blindtune.methods import load_run_config
from blindtune.runner import run_experiment

SWEEP_JSON = "sweep.json"
SWEEP_TABLE = "sweep.md"
SWEEP_PLOT = "privacy_utility.png"


def parse_epsilons(text: str) -> list[float]:
    """ "1,3,10,inf" -> [1.0, 3.0, 10.0, inf]; each must be >= 0."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--epsilons must be comma-separated numbers or inf, got {text!r}") from error
    if not values or any(math.isnan(v) or v < 0 for v in values):
        raise ValueError(f"--epsilons must be numbers >= 0 (or inf), got {text!r}")
    return values


def epsilon_name(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def sweep_row(epsilon: float, results: dict[str, Any]) -> dict[str, Any]:
    privacy = results["privacy"]  # FedCoT's own figures are lifted into the privacy section
    top_k = next((key for key in privacy if key.startswith("recovery_rate_top")), None)
    return {
        "epsilon": epsilon_name(epsilon),  # the configured mean per private token: a detail
        "accuracy": results["metrics"]["plugin"],
        "epsilon_per_record": privacy.get("epsilon_per_record"),  # the headline: every channel, per prompt
        "epsilon_per_token": privacy.get("epsilon_per_token"),
        "epsilon_per_prompt": privacy.get("epsilon_per_prompt"),
        "recovery_rate": privacy.get("recovery_rate"),
        "recovery_rate_top_k": privacy.get(top_k) if top_k else None,
        "lm_recovery_rate": 1.0 if math.isinf(epsilon) else None,  # filled in by the attack (sent raw at inf)
        "rationales_kept": results["details"]["rationales"]["kept"],
        "ledger_passed": results["privacy"].get("ledger", {}).get("passed"),
    }


def finished_run(config: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """The results of an earlier sweep's run of exactly this config (a rerun sweep skips it), else None.
    The engine may differ: it changes where the clients run, not what they compute."""
    results_file, config_file = run_dir / "results.json", run_dir / "config.json"
    finished = results_file.is_file() and config_file.is_file()
    if finished and _without_engine(json.loads(config_file.read_text())) == _without_engine(config.to_dict()):
        return json.loads(results_file.read_text())
    return None


def _without_engine(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "federation": {k: v for k, v in config["federation"].items() if k != "engine"}}


def sweep(
    config_path: Path,
    epsilons: Sequence[float],
    out_dir: Path,
    engine: str | None = None,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    attack_prompts: int = 0,
) -> dict[str, Any]:
    """Run the config once per epsilon (with `settings` applied); attack the privatised prompts of every
    finite epsilon when `attack_prompts` > 0; write the table and the plot; return the table."""
    rows = []
    references: dict[str, float] = {}
    for index, epsilon in enumerate(epsilons):
        first = index == 0
        overrides: dict[str, Any] = {
            "fedcot": {"privatisation": {"epsilon": epsilon}},
            "baselines": {"centralized": False, "local_only": False} if not first else {},
        }
        if not first:
            overrides["fedcot"]["label_only_baseline"] = False
        if engine is not None:
            overrides["federation"] = {"engine": engine}
        config = load_run_config(config_path, merge(settings or {}, overrides))
        run_dir = out_dir / f"eps-{epsilon_name(epsilon)}"
        results = finished_run(config, run_dir) or run_experiment(config, run_dir, progress=progress)
        if first:
            references = {
                key: value
                for key, value in results["metrics"].items()
                if key in ("llm_zero_shot", "emulator_zero_shot", "label_only", "centralized", "local_only")
            }
        rows.append(sweep_row(epsilon, results))
    finite = [epsilon for epsilon in epsilons if not math.isinf(epsilon)]
    if attack_prompts > 0 and finite:
        attacks = attack_table(config_path, finite, attack_prompts, settings)
        for row, attack in zip((r for r in rows if r["epsilon"] != "inf"), attacks, strict=True):
            row["lm_recovery_rate"] = attack["lm_recovery_rate"]
    table = {"config": str(config_path), "settings": settings or {}, "references": references, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SWEEP_JSON).write_text(json.dumps(table, indent=2))
    (out_dir / SWEEP_TABLE).write_text(markdown_table(table))
    plot(table, out_dir / SWEEP_PLOT)
    return table


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "inf" if column.startswith("epsilon") else "none"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(table: dict[str, Any]) -> str:
    columns = [
        "epsilon_per_record", "epsilon_per_prompt", "accuracy", "epsilon", "epsilon_per_token",
        "recovery_rate", "lm_recovery_rate", "recovery_rate_top_k", "rationales_kept", "ledger_passed",
    ]  # fmt: skip
    lines = [
        f"# FedCoT privacy-utility sweep ({table['config']})",
        "",
        "epsilon_per_record: the per-record (per-prompt) guarantee with every channel counted (privatised prompt "
        "+ LoRA channel; inf: the LoRA state crossed without DP). epsilon_per_prompt: the text channel alone "
        "(largest over prompts). epsilon / epsilon_per_token: the configured mean and the largest per private "
        "token (details). recovery_rate: share of private tokens the mechanism left unchanged (what nearest-"
        "neighbour inversion finds). lm_recovery_rate: top-1 recovery of the LLM-prior likelihood attack "
        "(`benchmarks/fedcot_attack.py`) on the first privatised prompts of each client (none: not run).",
        "",
        f"Settings over the config: {json.dumps(table.get('settings', {}))}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(row.get(c), c) for c in columns) + " |" for row in table["rows"]]
    lines += [
        "",
        "References (epsilon-independent): " + ", ".join(f"{k} {v:.3f}" for k, v in table["references"].items()),
    ]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    """Accuracy and recovery rate against epsilon (categorical axis: inf has no place on a log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    positions = list(range(len(rows)))
    figure, accuracy_axis = plt.subplots(figsize=(6, 4))
    accuracy_axis.plot(positions, [r["accuracy"] for r in rows], "o-", color="tab:blue", label="SLM accuracy (FedCoT)")
    for name, style in (("label_only", "--"), ("emulator_zero_shot", ":")):
        if name in table["references"]:
            accuracy_axis.axhline(table["references"][name], linestyle=style, color="tab:gray", label=name)
    labels = [
        f"{'inf' if r.get('epsilon_per_record') is None else format(r['epsilon_per_record'], '.0f')}\n({r['epsilon']})"
        for r in rows
    ]
    accuracy_axis.set_xticks(positions, labels)
    accuracy_axis.set_xlabel("epsilon per record: prompt text + LoRA channel (largest); per token in brackets")
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.set_ylim(0, 1.05)
    attack_axis = accuracy_axis.twinx()
    attack_axis.plot(
        positions, [r["recovery_rate"] or 0.0 for r in rows], "s-", color="tab:red", label="tokens unchanged"
    )
    attacked = [
        (position, row["lm_recovery_rate"])
        for position, row in zip(positions, rows, strict=True)
        if row.get("lm_recovery_rate") is not None
    ]
    if attacked:
        attack_axis.plot(
            *zip(*attacked, strict=True), "^--", color="tab:orange", label="LLM-prior attack, top-1 recovery"
        )
    attack_axis.set_ylabel("share of private tokens recovered")
    attack_axis.set_ylim(0, 1.05)
    handles = accuracy_axis.get_legend_handles_labels()[0] + attack_axis.get_legend_handles_labels()[0]
    accuracy_axis.legend(handles=handles, loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FedCoT privacy-utility sweep over the privatisation epsilon")
    parser.add_argument("config", type=Path)
    parser.add_argument("--epsilons", default="1,3,10,inf", help="comma-separated, inf allowed")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", choices=["simulation", "inprocess"], default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY.PATH=VALUE (YAML)")
    parser.add_argument("--attack-prompts", type=int, default=15, help="prompts per client attacked; 0: none")
    args = parser.parse_args(argv)
    table = sweep(
        args.config,
        parse_epsilons(args.epsilons),
        args.out,
        args.engine,
        progress=not args.no_progress,
        settings=parse_settings(args.settings),
        attack_prompts=args.attack_prompts,
    )
    print(markdown_table(table))


if __name__ == "__main__":
    main()
