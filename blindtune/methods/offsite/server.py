"""Offsite tuning, server side.

    blindtune run blindtune/configs/offsite_wordnet_3clients.yaml --out runs/offsite

1. Build the emulator: the LLM with its middle block uniformly sub-sampled and/or its middle MLPs
   channel-pruned (`blindtune.models.handout`); the bottom/top k layers (the adapter) are kept intact
   so a trained adapter fits the LLM again.
2. Hand the emulator (never the LLM) to every client once.
3. Each round: send the global adapter, collect the clients' trained adapters, screen and FedAvg
   them (weighted by examples), checkpoint, and evaluate the LLM with the adapter plugged in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blindtune.methods.adapter_tuning import EmulatorSettings, HandedOutEmulator, serve_emulator
from blindtune.methods.base import ServerResult, ServerRun
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.models import load_model
from blindtune.models.distill import prepare_emulator, public_texts
from blindtune.models.handout import HandoutConfig, build_handout
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import LayerPlan, num_decoder_layers, plan_layers

if TYPE_CHECKING:
    from blindtune.config import RunConfig


def emulator_plan(llm: LoadedModel, method: OffsiteConfig) -> LayerPlan:
    return plan_layers(num_decoder_layers(llm.model), method.adapter_layers_per_side, method.middle_keep_every)


def handed_out_emulator(llm: LoadedModel, config: RunConfig, progress: bool) -> tuple[LayerPlan, LoadedModel]:
    """The emulator clients receive: layer-dropped, and distilled on public text when configured."""
    method: OffsiteConfig = config.method_config
    handout = build_handout(
        llm.model,
        llm.tokenizer,
        HandoutConfig(
            adapter_layers_per_side=method.adapter_layers_per_side,
            middle_keep_every=method.middle_keep_every,
            middle_mlp_keep=method.middle_mlp_keep,
            public_text=method.public_text,
        ),
    )
    plan = handout.plan
    emulator = LoadedModel(handout.model, llm.tokenizer, "emulator")
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


def run_server(run: ServerRun) -> ServerResult:
    config = run.config
    method: OffsiteConfig = config.method_config
    llm = load_model(config.model)
    plan, emulator = handed_out_emulator(llm, config, run.progress)
    details = {
        "llm_layers": plan.num_llm_layers,
        "emulator_layers": list(plan.emulator_layers),
        "middle_mlp_keep": method.middle_mlp_keep,
        "adapter_layers": method.adapter_layers,
        "distilled": method.distill is not None,
    }
    settings = EmulatorSettings(
        method.adapter, method.train_top_layers, method.public_text, method.privacy, method.adapt_middle_layers
    )
    return serve_emulator(run, llm, HandedOutEmulator(plan, emulator.model, details=details), settings)
