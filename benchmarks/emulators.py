"""Hand-outs side by side: how much of the LLM each emulator leaks, and whether adapters still transfer.

    python -m benchmarks.emulators --out benchmarks/results/emulators

For one LLEOT run config (default: LLEOT's demo config) and the real model, build the emulators
offsite tuning and LLEOT would hand out, with the same layer plan and public text:

    OT-uniform      middle layers dropped (every `middle_keep_every`-th kept), nothing trained
    OT-distilled    + Offsite-Tuning's NLD (LLEOT's stage-1 settings without proxy prompts)
    LLEOT           + proxy-prompt distillation, then loss landscape elevation (the config's)
    LLEOT, J = j    the same with a margin jitter j (one row per --jitters value)

and measure, for each: the PPL ratio to the LLM on held-out public text (against e^H), zero-shot
accuracy and CPL on each task, and the cosine between an untrained adapter's gradients on the
emulator and on the LLM (a soft prompt and LoRA on the adapter layers), on the first task's
validation examples. No federation runs: plug-in accuracy comes from `blindtune run` of the
OT/LLEOT configs. Trained emulators go to the user cache, so a second invocation only measures.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from blindtune.config import EvalConfig, packaged_config
from blindtune.data import load_task
from blindtune.eval.leakage import adapter_gradient_cosine, cpl, perplexities
from blindtune.methods import load_run_config
from blindtune.methods.lleot.config import LleotConfig
from blindtune.methods.lleot.elevation import Elevation, ElevationConfig
from blindtune.methods.lleot.server import emulator_plan
from blindtune.models import load_model
from blindtune.models.adapters import AdapterConfig, AdapterKind, untrained_adapter_state
from blindtune.models.distill import DistillConfig, prepare_emulator, public_texts
from blindtune.models.surgery import adapter_layer_map, build_emulator

GRADIENT_ADAPTERS = {
    "soft prompt": AdapterConfig(kind=AdapterKind.SOFT_PROMPT, prompt_length=5),
    "LoRA": AdapterConfig(kind=AdapterKind.LORA),
}


@dataclasses.dataclass
class Variant:
    name: str
    distill: DistillConfig | None
    elevation: ElevationConfig | None


def variants(method: LleotConfig, jitters: list[float]) -> list[Variant]:
    nld = dataclasses.replace(method.distill, ppd_weight=0.0)
    rows = [
        Variant("OT-uniform", None, None),
        Variant("OT-distilled", nld, None),
        Variant("LLEOT", method.distill, method.elevation),
    ]
    rows += [
        Variant(f"LLEOT, J = {jitter:g}", method.distill, dataclasses.replace(method.elevation, margin_jitter=jitter))
        for jitter in jitters
    ]
    return rows


def measure(config_path: Path, tasks: list[str], limit: int, jitters: list[float], steps: int | None) -> dict[str, Any]:
    config = load_run_config(config_path)
    method: LleotConfig = config.method_config
    if steps is not None:
        method.distill = dataclasses.replace(method.distill, steps=steps)
        method.elevation = dataclasses.replace(method.elevation, steps=steps)
    llm = load_model(config.model)
    plan = emulator_plan(llm, method)
    layer_map = adapter_layer_map(plan, method.train_top_layers)
    texts = public_texts(method.public_text, tasks[0], config.seed)
    task_data = {name: load_task(name, seed=config.seed) for name in tasks}
    evaluators = {name: EvalConfig(limit=limit).evaluator(data, progress=False) for name, data in task_data.items()}
    gradient_examples = task_data[tasks[0]].validation[:8]
    llm_accuracy = {
        name: evaluate(llm.model, llm.tokenizer, "LLM", reuse=True) for name, evaluate in evaluators.items()
    }

    rows = []
    for variant in variants(method, jitters):
        started = time.perf_counter()
        emulator = build_emulator(llm.model, plan)
        prepared = prepare_emulator(
            llm.model,
            emulator,
            plan,
            llm.tokenizer,
            texts.train,
            distill=variant.distill,
            then=Elevation(variant.elevation) if variant.elevation is not None else None,
            seed=config.seed,
            progress=False,
        )
        row: dict[str, Any] = {
            "variant": variant.name,
            "prepare_seconds": time.perf_counter() - started,
            "from_cache": prepared.from_cache,
        }
        row.update(perplexities(llm.model, emulator, llm.tokenizer, texts.heldout))
        if variant.elevation is not None:
            row["expected_ppl_ratio"] = math.exp(variant.elevation.margin)
        row["tasks"] = {}
        for name, evaluate in evaluators.items():
            accuracy = evaluate(emulator, llm.tokenizer, variant.name)
            row["tasks"][name] = {"emulator_zero_shot": accuracy, "cpl": cpl(accuracy, llm_accuracy[name])}
        row["gradient_cosine"] = {}
        for label, adapter in GRADIENT_ADAPTERS.items():
            state = untrained_adapter_state(copy.deepcopy(emulator), layer_map, adapter, config.seed)
            row["gradient_cosine"][label] = adapter_gradient_cosine(
                llm.model, emulator, layer_map, adapter, state, llm.tokenizer, gradient_examples
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"config": str(config_path), "limit": limit, "llm_zero_shot": llm_accuracy, "emulators": rows}


def markdown(results: dict[str, Any]) -> str:
    tasks = list(results["llm_zero_shot"])
    header = ["emulator", "PPL ratio (e^H)"]
    header += [f"{task}: zero-shot (CPL)" for task in tasks]
    header += [f"gradient cosine, {label}" for label in GRADIENT_ADAPTERS]
    lines = [
        f"Emulators of `{results['config']}` (`python -m benchmarks.emulators`), {results['limit']} test "
        "examples per task. LLM zero-shot: "
        + ", ".join(f"{task} {100 * acc:.1f}%" for task, acc in results["llm_zero_shot"].items())
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for row in results["emulators"]:
        expected = f" ({row['expected_ppl_ratio']:.1f})" if "expected_ppl_ratio" in row else ""
        cells = [row["variant"], f"{row['ppl_ratio']:.2f}{expected}"]
        cells += [f"{100 * row['tasks'][t]['emulator_zero_shot']:.1f}% ({row['tasks'][t]['cpl']:.0f})" for t in tasks]
        cells += [f"{row['gradient_cosine'][label]:.3f}" for label in GRADIENT_ADAPTERS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=packaged_config("lleot_wordnet_3clients.yaml"))
    parser.add_argument("--tasks", nargs="+", default=["wordnet-supersense", "wordnet-verb-supersense"])
    parser.add_argument("--limit", type=int, default=200, help="test examples per task")
    parser.add_argument("--jitters", type=float, nargs="*", default=[1.5], help="margin jitters J to add as rows")
    parser.add_argument("--steps", type=int, default=None, help="distillation and elevation steps (default: config)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/emulators"))
    args = parser.parse_args()
    results = measure(args.config, args.tasks, args.limit, args.jitters, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "emulators.json").write_text(json.dumps(results, indent=2))
    (args.out / "report.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
