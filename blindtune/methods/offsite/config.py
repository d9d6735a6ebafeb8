"""Configuration of offsite tuning (Xiao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

from blindtune.eval.leakage import LeakageConfig
from blindtune.models.adapters import AdapterConfig
from blindtune.models.distill import DistillConfig


@dataclass
class OffsiteConfig:
    """The emulator the server hands out and the adapter clients train on it.

    adapter_layers_per_side: the bottom and top k decoder layers form the adapter.
    middle_keep_every: the emulator keeps 1 of every n middle layers (uniform layer drop).
    middle_mlp_keep: share of the MLP channels each kept middle layer keeps, the most important ones on
        the public text (training-free channel pruning, as GradOT prunes MLPs; 1: all). See
        `blindtune.models.handout`.
    train_top_layers: clients train the bottom and the top adapter layers (False: the bottom ones only;
        the top ones ship as frozen copies of the LLM's). Soft prompts train no layers either way.
    adapter: what is trained on the adapter layers (full layers or LoRA), or a soft prompt.
    distill: when set, the server distils the emulator's middle block towards the LLM on public text
        before handing it out (Offsite-Tuning's NLD, "OT-distilled"); None hands out the uniform one.
    public_text: the server's own text for distillation and the perplexity measurement
        (see `blindtune.models.distill.public_texts`); never client data.
    privacy: what is measured of the emulator's capability leakage (results.json `privacy`); null: nothing.
    cache_emulator: reuse a distilled emulator from the user cache when the settings match.
    """

    adapter_layers_per_side: int = 3
    middle_keep_every: int = 3
    middle_mlp_keep: float = 1.0
    train_top_layers: bool = True
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    distill: DistillConfig | None = None
    public_text: str = "wordnet:adj,adv"
    privacy: LeakageConfig | None = field(default_factory=LeakageConfig)
    cache_emulator: bool = True
