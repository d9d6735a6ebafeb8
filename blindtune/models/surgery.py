"""Layer surgery on decoder-only LMs: which layers form the adapter, and the layer-dropped emulator.

Offsite tuning splits the LLM's decoder layers into a bottom adapter, a middle block and a top
adapter. The emulator handed to clients is the LLM with the middle block sub-sampled; its adapter
layers are exact copies of the LLM's, so what clients train there plugs straight back into the LLM.

Canonical parameter names ("layers.<LLM layer index>.<name inside the layer>") identify adapter
weights independently of where a layer sits in a given model (position 9 in the emulator may be
layer 29 of the LLM), so payloads move between emulator and LLM without translation tables.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerPlan:
    """Which LLM layers the adapter and the emulator consist of (LLM layer indices, ascending)."""

    num_llm_layers: int
    bottom: tuple[int, ...]
    middle: tuple[int, ...]
    top: tuple[int, ...]

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        return self.bottom + self.top

    @property
    def emulator_layers(self) -> tuple[int, ...]:
        return self.bottom + self.middle + self.top

    @property
    def emulator_position_of(self) -> dict[int, int]:
        """LLM layer index -> position of that layer in the emulator."""
        return {source: position for position, source in enumerate(self.emulator_layers)}


def plan_layers(num_llm_layers: int, adapter_layers_per_side: int, middle_keep_every: int) -> LayerPlan:
    """Bottom/top `adapter_layers_per_side` layers form the adapter; keep 1 of every `middle_keep_every`
    middle layers (uniform sub-sampling, as in Offsite-Tuning). `middle_keep_every=1` keeps all."""
    k = adapter_layers_per_side
    if k < 1 or 2 * k >= num_llm_layers:
        raise ValueError(f"adapter_layers_per_side={k} must leave a middle block in a {num_llm_layers}-layer model")
    if middle_keep_every < 1:
        raise ValueError(f"middle_keep_every must be >= 1, got {middle_keep_every}")
    middle_all = range(k, num_llm_layers - k)
    return LayerPlan(
        num_llm_layers=num_llm_layers,
        bottom=tuple(range(k)),
        middle=tuple(middle_all[::middle_keep_every]),
        top=tuple(range(num_llm_layers - k, num_llm_layers)),
    )


def adapter_layer_map(plan: LayerPlan, train_top: bool = True, middle: bool = False) -> dict[int, int]:
    """Emulator position -> LLM layer index of the layers clients train: the bottom adapter layers, the
    kept middle layers when `middle`, and the top ones unless `train_top` is False (they then ship as
    frozen copies of the LLM's)."""
    trained = plan.bottom + (plan.middle if middle else ()) + (plan.top if train_top else ())
    return {plan.emulator_position_of[source]: source for source in trained}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = model.get_decoder().layers  # type: ignore[operator]
    assert isinstance(layers, nn.ModuleList)
    return layers


def num_decoder_layers(model: PreTrainedModel) -> int:
    return len(decoder_layers(model))


def build_emulator(llm: PreTrainedModel, plan: LayerPlan) -> PreTrainedModel:
    """A copy of `llm` whose decoder keeps only `plan.emulator_layers` (embeddings, norm and head too)."""
    if plan.num_llm_layers != num_decoder_layers(llm):
        raise ValueError(f"plan is for {plan.num_llm_layers} layers, model has {num_decoder_layers(llm)}")
    decoder = llm.get_decoder()
    all_layers = decoder.layers
    # Detach the layer list while copying so the deep copy never duplicates the whole LLM.
    decoder.layers = nn.ModuleList()
    try:
        emulator = copy.deepcopy(llm)
    finally:
        decoder.layers = all_layers
    emulator.get_decoder().layers = nn.ModuleList(copy.deepcopy(all_layers[i]) for i in plan.emulator_layers)
    _renumber_layers(emulator, plan.emulator_layers)
    return emulator


def _renumber_layers(model: PreTrainedModel, source_indices: Sequence[int]) -> None:
    # Attention modules index the KV cache by layer_idx; layer_types (when present) is per layer.
    for position, layer in enumerate(decoder_layers(model)):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = position
    model.config.num_hidden_layers = len(source_indices)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        model.config.layer_types = [layer_types[i] for i in source_indices]


def canonical_name(parameter_name: str, source_of_position: dict[int, int]) -> str | None:
    """'...layers.<position>.<rest>' -> 'layers.<source index>.<rest>'; None if not a layer parameter
    or the layer is not in `source_of_position`."""
    match = _LAYER_NAME.search(parameter_name)
    if match is None:
        return None
    source = source_of_position.get(int(match.group(1)))
    return None if source is None else f"layers.{source}.{match.group(2)}"


def split_canonical_name(name: str) -> tuple[int, str]:
    match = _LAYER_NAME.fullmatch(name) or _LAYER_NAME.search(name)
    if match is None or not name.startswith("layers."):
        raise ValueError(f"{name!r} is not a canonical adapter parameter name 'layers.<index>.<name>'")
    return int(match.group(1)), match.group(2)
