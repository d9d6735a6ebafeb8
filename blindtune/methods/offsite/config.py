"""Configuration of offsite tuning (Xiao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

from blindtune.eval.leakage import LeakageConfig
from blindtune.models.adapters import AdapterConfig, AdapterKind
from blindtune.models.distill import DistillConfig
from blindtune.models.surgery import LayerPlan, adapter_layer_map


@dataclass
class OffsiteConfig:
    """The emulator the server hands out and the adapter clients train on it.

    The defaults are blindtune's recipe (the demo's): a full-depth hand-out whose middle layers keep 10%
    of their MLP channels, useless alone, with LoRA on every layer, which carries to the LLM what the
    clients learn (benchmarks/results/handout-recipes). Offsite-Tuning's own emulator is
    `middle_keep_every: 3`, `middle_mlp_keep: 1.0`, `adapter_layers: ends`.

    adapter_layers_per_side: the bottom and top k decoder layers are kept intact in the emulator.
    adapter_layers: where clients train the adapter: `ends` (the bottom and top k layers, as in
        Offsite-Tuning) or `all` (every layer the emulator has, the pruned middle ones included). With a
        full-depth, channel-pruned hand-out, adapters throughout transfer far better: the top layers
        then need not learn to read a middle the LLM does not have
        (benchmarks/results/handout-recipes). Unset: `all` for a LoRA adapter trained on top and bottom
        layers, else `ends` (whole trained layers would carry the pruned MLPs into the LLM).
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
    adapter_layers: str | None = None
    middle_keep_every: int = 1
    middle_mlp_keep: float = 0.1
    train_top_layers: bool = True
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    distill: DistillConfig | None = None
    public_text: str = "wordnet:adj,adv"
    privacy: LeakageConfig | None = field(default_factory=LeakageConfig)
    cache_emulator: bool = True

    def __post_init__(self) -> None:
        if self.adapter_layers is None:
            lora_throughout = self.adapter.kind is AdapterKind.LORA and self.train_top_layers
            self.adapter_layers = "all" if lora_throughout else "ends"
        if self.adapter_layers not in ("ends", "all"):
            raise ValueError(f"offsite.adapter_layers must be 'ends' or 'all', got {self.adapter_layers!r}")
        if self.adapter_layers == "all" and not self.train_top_layers:
            raise ValueError("offsite.adapter_layers: all trains every layer; train_top_layers: false contradicts it")
        if self.adapter_layers == "all" and self.adapter.kind is AdapterKind.LAYERS:
            # Whole trained middle layers would carry the hand-out's pruned MLPs into the LLM.
            raise ValueError("offsite.adapter_layers: all needs a LoRA adapter (adapter.kind: lora), not whole layers")

    @property
    def adapt_middle_layers(self) -> bool:
        return self.adapter_layers == "all"

    def trained_layers(self, plan: LayerPlan) -> dict[int, int]:
        """Emulator position -> LLM layer of the layers clients train on an emulator of `plan`."""
        return adapter_layer_map(plan, self.train_top_layers, self.adapt_middle_layers)
