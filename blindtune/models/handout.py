"""The model the server hands out for adapter training, built from the LLM without training.

Two training-free ways to make the middle of the LLM useless alone, composable:

- layer drop (Offsite-Tuning's uniform emulator): keep 1 of every `middle_keep_every` middle layers;
  with `middle_share` the dropped layers are not removed but replaced by the kept layer before them
  (CRaSh's layer sharing), so the hand-out keeps the LLM's depth;
- channel pruning (GradOT/ScaleOT-style width compression): in every middle layer the hand-out keeps
  `middle_mlp_keep` of the MLP channels, the most important ones on public text
  (`blindtune.models.compression.measure_importance`); the others are zeroed in gate/up/down, so
  their weights never leave the server. The server keeps the LLM's shapes; clients get the hand-out
  without those channels (`blindtune.models.compact`), which halves their compute.

The bottom and top `adapter_layers_per_side` layers stay exact copies: adapters trained on them fit
the LLM again. With no layer dropped every hand-out layer is an LLM layer at the same depth, so
adapters can sit on all of them (`layer_map("all")`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blindtune.models.compression import measure_importance
from blindtune.models.distill import public_texts
from blindtune.models.surgery import (
    LayerPlan,
    adapter_layer_map,
    build_emulator,
    decoder_layers,
    num_decoder_layers,
    plan_layers,
)


@dataclass
class HandoutConfig:
    adapter_layers_per_side: int = 3
    middle_keep_every: int = 3
    middle_mlp_keep: float = 1.0
    middle_share: bool = False
    public_text: str = "wordnet:adj,adv"
    importance_texts: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.middle_mlp_keep <= 1:
            raise ValueError(f"middle_mlp_keep must be in [0, 1], got {self.middle_mlp_keep}")


@dataclass
class Handout:
    model: PreTrainedModel
    plan: LayerPlan
    parameter_share: float  # non-zero decoder-layer parameters as a share of the LLM's
    shared: bool = False  # full depth, dropped layers replaced by shared copies

    def layer_map(self, which: str) -> dict[int, int]:
        """Hand-out position -> LLM layer of the layers that get adapters: `ends` or `all`."""
        if not self.shared:
            return adapter_layer_map(self.plan, middle=which == "all")
        sources = self.plan.adapter_layers if which == "ends" else self.plan.emulator_layers
        return {source: source for source in sources}  # full depth: position = LLM layer


def _nonzero(layers: nn.ModuleList) -> int:
    return sum(int((p != 0).sum()) for p in layers.parameters())


def build_handout(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: HandoutConfig) -> Handout:
    plan = plan_layers(num_decoder_layers(llm), config.adapter_layers_per_side, config.middle_keep_every)
    model = build_emulator(llm, plan)
    if config.middle_mlp_keep < 1:
        texts = public_texts(config.public_text).train[: config.importance_texts]
        channels = measure_importance(llm, tokenizer, texts, max_length=64).mlp_channels
        keep = round(config.middle_mlp_keep * channels.shape[1])
        layers = decoder_layers(model)
        with torch.no_grad():
            for source in plan.middle:
                mlp: Any = layers[plan.emulator_position_of[source]].mlp
                dropped = channels[source].argsort(descending=True)[keep:]
                mlp.gate_proj.weight[dropped] = 0
                mlp.up_proj.weight[dropped] = 0
                mlp.down_proj.weight[:, dropped] = 0
    share = _nonzero(decoder_layers(model)) / _nonzero(decoder_layers(llm))
    if config.middle_share:
        kept = dict(zip(plan.emulator_layers, decoder_layers(model), strict=True))
        previous = kept[plan.bottom[-1]]
        full_depth: list[nn.Module] = []
        for index in range(plan.num_llm_layers):
            previous = kept.get(index, previous)
            full_depth.append(previous)
        model.get_decoder().layers = nn.ModuleList(full_depth)
    return Handout(model, plan, share, shared=config.middle_share)
