"""Configuration of LLEOT: offsite tuning with an emulator whose loss is elevated above the LLM's."""

from __future__ import annotations

from dataclasses import dataclass, field

from blindtune.eval.leakage import LeakageConfig
from blindtune.methods.lleot.elevation import ElevationConfig
from blindtune.models.adapters import AdapterConfig, AdapterKind
from blindtune.models.distill import DistillConfig


def _soft_prompt() -> AdapterConfig:
    return AdapterConfig(kind=AdapterKind.SOFT_PROMPT, prompt_length=5)


def _distill_with_proxy_prompts() -> DistillConfig:
    return DistillConfig(ppd_weight=10.0)


@dataclass
class LleotConfig:
    """The elevated emulator the server hands out and the adapter clients train on it.

    adapter_layers_per_side / middle_keep_every: the layer-dropped emulator, as in offsite tuning.
    train_top_layers: clients train the bottom and the top adapter layers (False: the bottom ones only,
        the top ones ship frozen). Trainable top layers sit between the elevated middle block and the
        output, where an adapter can learn to undo the elevation instead of the task. The simulated
        client of `elevation.client_steps` trains the same layers.
    adapter: what clients train: a 5-token soft prompt by default, or layers / LoRA on the adapter layers.
    public_text: the server's own text for distillation, elevation and the perplexity measurement
        (`wordnet:<pos>,...`, `task:<name>` of another task, or a text file; never client data).
    distill: stage 1, L = L_LM + ppd_weight * L_PPD + kd_weight * L_KD (1 : 10 : 30).
    elevation: stage 2, E |L_emu(P'; x) - L_LLM(P'; x) - H| with H = elevation.margin, and/or
        (teacher_weight > 0) token by token towards the exact-margin distribution (elevation.py).
    privacy: what is measured about the emulator (extra tasks for CPL, gradient examples).
    cache_emulator: reuse a trained emulator from the user cache when model and settings match.
    """

    adapter_layers_per_side: int = 3
    middle_keep_every: int = 3
    train_top_layers: bool = True
    adapter: AdapterConfig = field(default_factory=_soft_prompt)
    public_text: str = "wordnet:adj,adv"
    distill: DistillConfig = field(default_factory=_distill_with_proxy_prompts)
    elevation: ElevationConfig = field(default_factory=ElevationConfig)
    privacy: LeakageConfig = field(default_factory=LeakageConfig)
    cache_emulator: bool = True
