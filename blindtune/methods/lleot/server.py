"""LLEOT (loss landscape elevation for offsite tuning), server side.

    blindtune run blindtune/configs/lleot_wordnet_3clients.yaml --out runs/lleot

Offsite tuning's emulator answers questions nearly as well as the LLM, so handing it out leaks the
model. LLEOT hands out an emulator whose loss sits a fixed margin H above the LLM's wherever clients'
adapters go. With A an adapter (a soft prompt P, or adapter-layer weights), x text, and the emulator's
middle-block weights theta the only thing trained:

    stage 1, distillation on public text x (P' ~ N(0, sigma^2 I) random proxy prompts):
        min_theta  L_LM(emu; x) + 10 * L_PPD + 30 * L_KD,
        L_KD  = E_x     mean(((h_LLM(x)     - h_emu(x))     / rms(h_LLM(x)))^2),
        L_PPD = E_P',x  mean(((h_LLM(P'; x) - h_emu(P'; x)) / rms(h_LLM(P'; x)))^2)
    stage 2, loss landscape elevation:
        min_theta  E_{P', x, A ~ A_0 + noise} | L_emu(A, P'; x) - L_LLM(A, P'; x) - H |
    and/or (ours, elevation.teacher_weight) the same margin token by token: the emulator learns
        p_LLM(y | A, P'; x) e^-H outside a secret set of absorbing tokens that takes the rest of the mass
    and optionally (ours, elevation.client_steps) with A also drawn from a simulated client's path,
        A_{t+1} = A_t - lr * AdamW(grad_A L_emu(A_t; x)), restarted from A_0 every client_steps steps:
        random noise covers the untrained adapter only, while a trained adapter finds the direction
        that undoes the elevation (measured: LoRA on the top layers learns that instead of the task).
        The client trains the layers clients do: with train_top_layers false, the bottom ones only,
        whose update reaches the output through the middle block, where the margin can be held.

If the margin is exact, L_emu(A) = L_LLM(A) + H for every A, hence
    PPL_emu = e^H * PPL_LLM           (the emulator is useless for inference: H = 4 gives ~55x)
    grad_A L_emu(A) = grad_A L_LLM(A)  (an adapter trained on the emulator is trained for the LLM).
Measured: the PPL ratio on held-out public text, CPL = emulator zero-shot / LLM zero-shot * 100 per
task, the cosine between adapter gradients on emulator and LLM, and plug-in accuracy.

Then the federation runs as in offsite tuning: hand the emulator out once; each round send the global
adapter, collect, screen and aggregate the clients' adapters, and evaluate the LLM with it plugged in.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from blindtune.data import load_task
from blindtune.federation.adapter_rounds import hand_out
from blindtune.methods.adapter_tuning import federate
from blindtune.methods.base import ServerRun
from blindtune.methods.lleot.config import LleotConfig
from blindtune.models import load_model
from blindtune.models.adapters import untrained_adapter_state
from blindtune.models.distill import (
    PreparedEmulator,
    adapter_gradient_cosine,
    leakage_report,
    prepare_emulator,
    public_texts,
)
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import LayerPlan, adapter_layer_map, build_emulator, num_decoder_layers, plan_layers
from blindtune.privacy.audit import METHOD_PRIVACY


def emulator_plan(llm: LoadedModel, method: LleotConfig) -> LayerPlan:
    return plan_layers(num_decoder_layers(llm.model), method.adapter_layers_per_side, method.middle_keep_every)


def elevated_emulator(
    llm: LoadedModel, plan: LayerPlan, method: LleotConfig, task: str, seed: int, progress: bool
) -> tuple[PreparedEmulator, list[str]]:
    """The distilled-then-elevated emulator (from the cache when possible) and the held-out public texts."""
    texts = public_texts(method.public_text, task, seed)
    prepared = prepare_emulator(
        llm.model,
        build_emulator(llm.model, plan),
        plan,
        llm.tokenizer,
        texts.train,
        distill=method.distill,
        elevation=method.elevation,
        seed=seed,
        cache=method.cache_emulator,
        progress=progress,
        client_layers=tuple(adapter_layer_map(plan, method.train_top_layers).values()),  # what clients train
    )
    return prepared, texts.heldout


def run_server(run: ServerRun) -> dict[str, Any]:
    config = run.config
    method: LleotConfig = config.method_config
    llm = load_model(config.model)
    task = config.load_task()
    evaluate = config.eval.evaluator(task, run.progress)

    plan = emulator_plan(llm, method)
    prepared, heldout = elevated_emulator(llm, plan, method, config.task, config.seed, run.progress)
    emulator = LoadedModel(prepared.model, llm.tokenizer, "emulator")
    metrics = {
        "llm_zero_shot": evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True),
        "emulator_zero_shot": evaluate(emulator.model, llm.tokenizer, "emulator zero-shot"),
    }
    zero_shot = {config.task: (metrics["llm_zero_shot"], metrics["emulator_zero_shot"])}
    for name in method.privacy.extra_tasks:
        evaluate_other = config.eval.evaluator(load_task(name, seed=config.seed), run.progress)
        zero_shot[name] = (
            evaluate_other(llm.model, llm.tokenizer, f"LLM zero-shot {name}"),
            evaluate_other(emulator.model, llm.tokenizer, f"emulator zero-shot {name}"),
        )
    privacy = leakage_report(
        llm.model,
        emulator.model,
        llm.tokenizer,
        heldout,
        zero_shot,
        margin=method.elevation.margin,
        max_length=method.privacy.ppl_max_length,
    )

    layer_map = adapter_layer_map(plan, method.train_top_layers)
    initial = untrained_adapter_state(copy.deepcopy(emulator.model), layer_map, method.adapter, config.seed)
    gradient_examples = task.validation[: method.privacy.gradient_examples] or task.train[:8]

    def gradient_cosine(state: dict) -> float:
        return adapter_gradient_cosine(
            llm.model, emulator.model, layer_map, method.adapter, state, llm.tokenizer, gradient_examples
        )

    privacy["gradient_cosine"] = gradient_cosine(initial)
    hand_out(run.exchange, emulator, layer_map, config.federation.required_replies)

    def evaluate_plugin(adapted: nn.Module, round_number: int) -> float:
        return evaluate(adapted, llm.tokenizer, f"plug-in round {round_number}")

    outcome = federate(run, method.adapter, initial, llm.model, evaluate_plugin)
    metrics["plugin"] = outcome.history[-1]["plugin"]
    if set(outcome.state) == set(initial):  # a complete adapter (not a stacked FLoRA state)
        privacy["gradient_cosine_final"] = gradient_cosine(outcome.state)
    metrics.update({key: privacy[key] for key in ("cpl", "ppl_ratio", "gradient_cosine")})
    return {
        "metrics": metrics,
        "history": outcome.history,
        "clients": outcome.clients,
        METHOD_PRIVACY: {"emulator": privacy},  # lifted into results.json `privacy`
        "emulator": {
            "llm_layers": plan.num_llm_layers,
            "emulator_layers": list(plan.emulator_layers),
            "from_cache": prepared.from_cache,
            "training": {stage: steps[-1] for stage, steps in prepared.history.items() if steps},
            "margin": method.elevation.margin,
            "expected_ppl_ratio": math.exp(method.elevation.margin),
        },
    }
