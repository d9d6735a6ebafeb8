"""Offsite tuning, server side.

    blindtune run blindtune/configs/offsite_wordnet_3clients.yaml --out runs/offsite

1. Build the emulator: the LLM with its middle block uniformly sub-sampled; the bottom/top k layers
   (the adapter) are kept intact so a trained adapter fits the LLM again.
2. Hand the emulator (never the LLM) to every client once.
3. Each round: send the global adapter, collect the clients' trained adapters, screen and FedAvg
   them (weighted by examples), checkpoint, and evaluate the LLM with the adapter plugged in.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from torch import nn

from blindtune.data import load_task
from blindtune.federation.adapter_rounds import hand_out
from blindtune.methods.adapter_tuning import federate
from blindtune.methods.base import ServerRun
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.models import load_model
from blindtune.models.adapters import untrained_adapter_state
from blindtune.models.distill import adapter_gradient_cosine, leakage_report, prepare_emulator, public_texts
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import LayerPlan, adapter_layer_map, build_emulator, num_decoder_layers, plan_layers
from blindtune.privacy.audit import METHOD_PRIVACY

if TYPE_CHECKING:
    from blindtune.config import RunConfig


def emulator_plan(llm: LoadedModel, method: OffsiteConfig) -> LayerPlan:
    return plan_layers(num_decoder_layers(llm.model), method.adapter_layers_per_side, method.middle_keep_every)


def handed_out_emulator(llm: LoadedModel, config: RunConfig, progress: bool) -> tuple[LayerPlan, LoadedModel]:
    """The emulator clients receive: layer-dropped, and distilled on public text when configured."""
    method: OffsiteConfig = config.method_config
    plan = emulator_plan(llm, method)
    emulator = LoadedModel(build_emulator(llm.model, plan), llm.tokenizer, "emulator")
    if method.distill is not None:
        prepare_emulator(
            llm.model,
            emulator.model,
            plan,
            llm.tokenizer,
            public_texts(method.public_text, config.task, config.seed).train,
            distill=method.distill,
            seed=config.seed,
            cache=method.cache_emulator,
            progress=progress,
        )
    return plan, emulator


def run_server(run: ServerRun) -> dict[str, Any]:
    config = run.config
    method: OffsiteConfig = config.method_config
    llm = load_model(config.model)
    task = config.load_task()
    evaluate = config.eval.evaluator(task, run.progress)

    plan, emulator = handed_out_emulator(llm, config, run.progress)
    texts = public_texts(method.public_text, config.task, config.seed) if method.privacy else None
    metrics = {
        "llm_zero_shot": evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True),
        "emulator_zero_shot": evaluate(emulator.model, llm.tokenizer, "emulator zero-shot"),
    }
    layer_map = adapter_layer_map(plan, method.train_top_layers)
    initial = untrained_adapter_state(copy.deepcopy(emulator.model), layer_map, method.adapter, config.seed)
    privacy: dict[str, Any] | None = None
    if method.privacy is not None and texts is not None:
        zero_shot = {config.task: (metrics["llm_zero_shot"], metrics["emulator_zero_shot"])}
        for name in method.privacy.extra_tasks:
            evaluate_other = config.eval.evaluator(load_task(name, seed=config.seed), run.progress)
            zero_shot[name] = (
                evaluate_other(llm.model, llm.tokenizer, f"LLM zero-shot {name}"),
                evaluate_other(emulator.model, llm.tokenizer, f"emulator zero-shot {name}"),
            )
        privacy = leakage_report(
            llm.model, emulator.model, llm.tokenizer, texts.heldout, zero_shot, max_length=method.privacy.ppl_max_length
        )
        gradient_examples = task.validation[: method.privacy.gradient_examples] or task.train[:8]
        privacy["gradient_cosine"] = adapter_gradient_cosine(
            llm.model, emulator.model, layer_map, method.adapter, initial, llm.tokenizer, gradient_examples
        )
    hand_out(run.exchange, emulator, layer_map, config.federation.required_replies)
    if privacy is None:
        del emulator

    def evaluate_plugin(adapted: nn.Module, round_number: int) -> float:
        return evaluate(adapted, llm.tokenizer, f"plug-in round {round_number}")

    outcome = federate(run, method.adapter, initial, llm.model, evaluate_plugin)
    metrics["plugin"] = outcome.history[-1]["plugin"]
    results = {
        "metrics": metrics,
        "history": outcome.history,
        "clients": outcome.clients,
        "emulator": {
            "llm_layers": plan.num_llm_layers,
            "emulator_layers": list(plan.emulator_layers),
            "distilled": method.distill is not None,
        },
    }
    if privacy is not None:
        if set(outcome.state) == set(initial):  # the global state is a complete adapter (not FLoRA's stack)
            privacy["gradient_cosine_final"] = adapter_gradient_cosine(
                llm.model, emulator.model, layer_map, method.adapter, outcome.state, llm.tokenizer, gradient_examples
            )
        metrics.update({key: privacy[key] for key in ("cpl", "ppl_ratio", "gradient_cosine")})
        results[METHOD_PRIVACY] = {"emulator": privacy}  # lifted into results.json `privacy`
    return results
