"""Hand-out recipes side by side, on the validation split: useless alone, and does an adapter transfer?

    python -m benchmarks.handout_recipes --out benchmarks/results/handout-recipes --steps 120

Every variant is a hand-out built from the real LLM without training (so a row costs minutes) and an
adapter placement on it. For each, on the *validation* split of each task:

- capability_retained = (hand-out accuracy - chance) / (LLM accuracy - chance), zero-shot, per task;
- the hand-out's perplexity ratio to the LLM on held-out public text (WordNet adjective/adverb glosses);
- transfer: one LoRA trained on the hand-out with the run task's pooled train examples for `--steps`
  steps (no federation: this isolates the hand-out's part of the gap), scored on the hand-out and
  plugged into the LLM; next to it the same LoRA trained directly on the LLM (the centralised row);
- the cosine between the untrained adapter's gradients on the hand-out and on the LLM.

Federation (rounds, server learning rate) is measured by `blindtune run`, not here.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blindtune.config import EvalConfig
from blindtune.data import load_task
from blindtune.data.task import TaskData
from blindtune.eval.leakage import adapter_gradient_cosine, capability_retained, chance_accuracy, perplexities
from blindtune.models import load_model
from blindtune.models.adapters import AdapterConfig, attach_adapter, plugged_in
from blindtune.models.distill import public_texts
from blindtune.models.handout import HandoutConfig, build_handout
from blindtune.models.loading import LoadedModel
from blindtune.training.loop import TrainConfig, train

LORA = AdapterConfig(lora_rank=8, lora_alpha=16)
VALIDATION = EvalConfig(split="validation", limit=None)  # variants are chosen on the validation split


@dataclass
class Variant:
    name: str
    handout: HandoutConfig
    adapter_layers: str  # "ends": the bottom/top k layers; "all": every layer the hand-out has


def measure(
    variant: Variant, llm: LoadedModel, tasks: dict[str, TaskData], steps: int, seed: int, with_llm_row: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    handout = build_handout(llm.model, llm.tokenizer, variant.handout)
    layer_map = handout.layer_map(variant.adapter_layers)
    run_task = next(iter(tasks.values()))
    row: dict[str, Any] = {
        "variant": variant.name,
        "handout": asdict(variant.handout),
        "adapters": variant.adapter_layers,
    }
    row["handout_parameter_share"] = handout.parameter_share
    row.update(perplexities(llm.model, handout.model, llm.tokenizer, public_texts("wordnet:adj,adv").heldout))
    row["tasks"] = {}
    for name, task in tasks.items():
        evaluate = VALIDATION.evaluator(task, progress=False)
        llm_accuracy = evaluate(llm.model, llm.tokenizer, "LLM", reuse=True)
        handout_accuracy = evaluate(handout.model, llm.tokenizer, "hand-out")
        base = chance_accuracy(task.validation)
        row["tasks"][name] = {
            "chance": base,
            "llm": llm_accuracy,
            "handout": handout_accuracy,
            "capability_retained": capability_retained(handout_accuracy, llm_accuracy, base),
        }
    row["gradient_cosine"] = adapter_gradient_cosine(
        llm.model,
        handout.model,
        layer_map,
        LORA,
        _initial_state(handout.model, layer_map, seed),
        llm.tokenizer,
        run_task.train[-8:],
    )
    budget = TrainConfig(steps=steps, batch_size=8, learning_rate=2e-3)
    evaluate = VALIDATION.evaluator(run_task, progress=False)
    adapted = attach_adapter(copy.deepcopy(handout.model), layer_map, LORA, seed=seed)
    stats = train(adapted.model, llm.tokenizer, run_task.train, budget, seed=seed, progress=False)
    row["trained_on_handout"] = {
        "mean_loss": stats.mean_loss,
        "on_handout": evaluate(adapted.model, llm.tokenizer, "on hand-out"),
    }
    with plugged_in(llm.model, adapted.state(), LORA) as plugged:
        row["trained_on_handout"]["plugged_into_llm"] = evaluate(plugged, llm.tokenizer, "plugged")
    if with_llm_row:
        row["trained_on_llm"] = trained_on_llm(llm, run_task, tuple(sorted(layer_map.values())), budget, seed)
    row["seconds"] = time.perf_counter() - started
    return row


_DIRECT: dict[tuple[int, ...], float] = {}


def trained_on_llm(llm: LoadedModel, task: TaskData, layers: tuple[int, ...], budget: TrainConfig, seed: int) -> float:
    """The centralised row: the same LoRA trained on the LLM's own layers (once per layer set)."""
    if layers not in _DIRECT:
        direct = attach_adapter(copy.deepcopy(llm.model), {i: i for i in layers}, LORA, seed=seed)
        train(direct.model, llm.tokenizer, task.train, budget, seed=seed, progress=False)
        _DIRECT[layers] = VALIDATION.evaluator(task, progress=False)(direct.model, llm.tokenizer, "on LLM")
    return _DIRECT[layers]


def _initial_state(model: nn.Module, layer_map: dict[int, int], seed: int) -> dict[str, torch.Tensor]:
    return attach_adapter(copy.deepcopy(model), layer_map, LORA, seed=seed).state()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", required=True, help="name=json-of-HandoutConfig@ends|all")
    parser.add_argument("--tasks", nargs="+", default=["wordnet-supersense", "wordnet-definition", "piqa"])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-llm-row", action="store_true", help="skip the LoRA trained on the LLM itself")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    llm = load_model("smollm2-135m-instruct")
    tasks = {name: load_task(name, seed=args.seed) for name in args.tasks}
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.variants:
        name, rest = spec.split("=", 1)
        settings, adapters = rest.rsplit("@", 1)
        variant = Variant(name, HandoutConfig(**json.loads(settings)), adapters)
        row = measure(variant, llm, tasks, args.steps, args.seed, not args.no_llm_row)
        (args.out / f"{name}.json").write_text(json.dumps(row, indent=2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
