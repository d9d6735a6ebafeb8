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

Then the federation runs as in offsite tuning (the same server body,
`blindtune.methods.adapter_tuning.serve_emulator`): hand the emulator out once; each round send the
global adapter, collect, screen and aggregate the clients' adapters, and evaluate the LLM with it
plugged in. The elevation itself is `blindtune.methods.lleot.elevation`.
"""

from __future__ import annotations

import math

from blindtune.methods.adapter_tuning import EmulatorSettings, HandedOutEmulator, serve_emulator
from blindtune.methods.base import ServerResult, ServerRun
from blindtune.methods.lleot.config import LleotConfig
from blindtune.methods.lleot.elevation import Elevation
from blindtune.models import load_model
from blindtune.models.distill import PreparedEmulator, prepare_emulator, public_texts
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import LayerPlan, adapter_layer_map, build_emulator, num_decoder_layers, plan_layers


def emulator_plan(llm: LoadedModel, method: LleotConfig) -> LayerPlan:
    return plan_layers(num_decoder_layers(llm.model), method.adapter_layers_per_side, method.middle_keep_every)


def elevated_emulator(
    llm: LoadedModel, plan: LayerPlan, method: LleotConfig, task: str, seed: int, progress: bool
) -> PreparedEmulator:
    """The distilled-then-elevated emulator (from the cache when possible)."""
    client_layers = tuple(adapter_layer_map(plan, method.train_top_layers).values())  # what clients train
    return prepare_emulator(
        llm.model,
        build_emulator(llm.model, plan),
        plan,
        llm.tokenizer,
        public_texts(method.public_text, task, seed).train,
        distill=method.distill,
        then=Elevation(method.elevation, client_layers),
        seed=seed,
        cache=method.cache_emulator,
        progress=progress,
    )


def run_server(run: ServerRun) -> ServerResult:
    config = run.config
    method: LleotConfig = config.method_config
    llm = load_model(config.model)
    plan = emulator_plan(llm, method)
    prepared = elevated_emulator(llm, plan, method, config.task, config.seed, run.progress)
    details = {
        "llm_layers": plan.num_llm_layers,
        "emulator_layers": list(plan.emulator_layers),
        "from_cache": prepared.from_cache,
        "training": {stage: steps[-1] for stage, steps in prepared.history.items() if steps},
        "margin": method.elevation.margin,
        "expected_ppl_ratio": math.exp(method.elevation.margin),
    }
    emulator = HandedOutEmulator(plan, prepared.model, margin=method.elevation.margin, details=details)
    settings = EmulatorSettings(method.adapter, method.train_top_layers, method.public_text, method.privacy)
    return serve_emulator(run, llm, emulator, settings)
