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
from typing import Any

from torch import nn

from blindtune.data import load_task
from blindtune.federation.adapter_rounds import RoundSettings, hand_out, run_rounds
from blindtune.federation.strategies import build_strategy
from blindtune.methods.base import ServerRun
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.models import load_model
from blindtune.models.adapters import untrained_adapter_state
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import LayerPlan, build_emulator, num_decoder_layers, plan_layers


def emulator_plan(llm: LoadedModel, method: OffsiteConfig) -> LayerPlan:
    return plan_layers(num_decoder_layers(llm.model), method.adapter_layers_per_side, method.middle_keep_every)


def adapter_layer_map(plan: LayerPlan) -> dict[int, int]:
    """Emulator position -> LLM layer index, for the adapter layers only."""
    return {plan.emulator_position_of[source]: source for source in plan.adapter_layers}


def run_server(run: ServerRun) -> dict[str, Any]:
    config = run.config
    method: OffsiteConfig = config.method_config
    llm = load_model(config.model)
    evaluate = config.eval.evaluator(load_task(config.task, config.data_dir, seed=config.seed), run.progress)

    plan = emulator_plan(llm, method)
    emulator = LoadedModel(build_emulator(llm.model, plan), llm.tokenizer, "emulator")
    metrics = {
        "llm_zero_shot": evaluate(llm.model, llm.tokenizer, "LLM zero-shot"),
        "emulator_zero_shot": evaluate(emulator.model, llm.tokenizer, "emulator zero-shot"),
    }
    layer_map = adapter_layer_map(plan)
    initial = untrained_adapter_state(copy.deepcopy(emulator.model), layer_map, method.adapter, config.seed)
    hand_out(run.exchange, emulator, layer_map, config.federation.required_replies)
    del emulator

    def evaluate_plugin(adapted: nn.Module, round_number: int) -> float:
        return evaluate(adapted, llm.tokenizer, f"plug-in round {round_number}")

    settings = RoundSettings(
        rounds=config.federation.rounds,
        min_replies=config.federation.required_replies,
        max_update_norm_ratio=config.federation.max_update_norm_ratio,
        seed=config.seed,
        evaluate_every_round=config.eval.every_round,
        checkpoint_dir=run.out_dir / "checkpoints",
        resume=run.resume,
    )
    strategy = build_strategy(config.federation.strategy, method.adapter, config.federation.proximal_mu)
    outcome = run_rounds(run.exchange, initial, settings, strategy, llm.model, evaluate_plugin)
    metrics["plugin"] = outcome.history[-1]["plugin"]
    return {
        "metrics": metrics,
        "history": outcome.history,
        "clients": outcome.clients,
        "emulator": {"llm_layers": plan.num_llm_layers, "emulator_layers": list(plan.emulator_layers)},
    }
