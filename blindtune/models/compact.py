"""A hand-out without the MLP channels it zeroed: the same model, at half the clients' compute.

A channel-pruned hand-out (`blindtune.models.handout`) keeps the LLM's shapes: 90% of each middle
MLP's channels are zeros that every client would multiply through at every step. `compacted`
removes them (gated MLPs: gate_proj and up_proj rows, down_proj columns), so the hand-out ships and
computes at its real size, and `MlpChannels` remembers which of the LLM's channels each layer kept.

Training an adapter on the compact model is training it on the zeroed one. A zeroed channel's output
is act(gate) * up with both 0; LoRA's B starts at 0, and the gradient of gate's B row is zero while
up's row is zero and the other way round (act(0) = 0), so both rows stay zero and down_proj's LoRA A
never sees an input there. The full-shape adapter state the server sends and receives therefore
maps onto the compact model and back exactly (`compact_state` / `full_state`): the dropped entries
keep the values the server sent. Only DP-SGD's noise, which the zeroed model would add to those
entries too, differs: on the compact model the adapter simply has none there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from blindtune.models.surgery import decoder_layers, split_canonical_name

ModelT = TypeVar("ModelT", bound=nn.Module)

_ROWS = ("gate_proj", "up_proj")  # a channel is one output row of these
_COLUMNS = ("down_proj",)  # and one input column of this


@dataclass(frozen=True)
class MlpChannels:
    """Per decoder-layer position of a compact model, the MLP channels (indices into the LLM's
    `width` channels, ascending) it kept; layers not listed are uncompacted."""

    width: int = 0
    kept: dict[int, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "kept": {str(position): kept for position, kept in self.kept.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MlpChannels:
        return cls(int(data["width"]), {int(position): list(kept) for position, kept in data["kept"].items()})

    def compact_state(self, state: Mapping[str, torch.Tensor], layer_map: dict[int, int]) -> dict[str, torch.Tensor]:
        """An adapter state in the LLM's shapes, cut to the channels the compact model has."""
        kept_of_source = self._kept_of_source(layer_map)
        compact = {}
        for name, tensor in state.items():
            dim, kept = _channel_dim(name, kept_of_source)
            compact[name] = tensor if dim is None else tensor.index_select(dim, torch.tensor(kept))
        return compact

    def full_state(
        self, compact: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], layer_map: dict[int, int]
    ) -> dict[str, torch.Tensor]:
        """A state trained on the compact model, back in the LLM's shapes: the dropped channels' entries
        keep `template`'s values (the state the server sent) where it has them in that shape, else 0."""
        kept_of_source = self._kept_of_source(layer_map)
        full = {}
        for name, tensor in compact.items():
            dim, kept = _channel_dim(name, kept_of_source)
            if dim is None:
                full[name] = tensor
                continue
            shape = list(tensor.shape)
            shape[dim] = self.width
            base = template.get(name)
            base = base.clone() if base is not None and list(base.shape) == shape else tensor.new_zeros(shape)
            full[name] = base.index_copy(dim, torch.tensor(kept), tensor)
        return full

    def _kept_of_source(self, layer_map: dict[int, int]) -> dict[int, list[int]]:
        return {layer_map[position]: kept for position, kept in self.kept.items() if position in layer_map}


def _channel_dim(name: str, kept_of_source: dict[int, list[int]]) -> tuple[int | None, list[int]]:
    """Which dimension of an adapter tensor indexes a compacted layer's MLP channels (None: none)."""
    if not name.startswith("layers."):
        return None, []
    source, inner = split_canonical_name(name)
    kept = kept_of_source.get(source)
    if kept is None or not inner.startswith("mlp."):
        return None, []
    module, _, parameter = inner.removeprefix("mlp.").partition(".")
    if module in _ROWS and parameter in ("weight", "bias", "lora_B.weight"):
        return 0, kept
    if module in _COLUMNS and parameter in ("weight", "lora_A.weight"):
        return 1, kept
    return None, []


def _gated_mlp(layer: nn.Module) -> Any:
    mlp = getattr(layer, "mlp", None)
    names = (*_ROWS, *_COLUMNS)
    return mlp if mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names) else None


def _resized(linear: nn.Linear, rows: int, columns: int) -> nn.Linear:
    resized = nn.Linear(columns, rows, bias=linear.bias is not None, dtype=linear.weight.dtype)
    return resized.to(linear.weight.device)


def compacted(model: ModelT) -> tuple[ModelT, MlpChannels]:
    """`model` without the gated-MLP channels whose weights are all zero (gate_proj and up_proj rows,
    down_proj column, their biases), and the channels each compacted layer kept. A copy: the caller's
    model is left as it is; `model` itself when it has no such channel."""
    width = 0
    kept: dict[int, torch.Tensor] = {}
    for position, layer in enumerate(decoder_layers(model)):
        mlp = _gated_mlp(layer)
        if mlp is None:
            continue
        width = mlp.gate_proj.out_features
        used = mlp.down_proj.weight.ne(0).any(dim=0)
        for name in _ROWS:
            linear = getattr(mlp, name)
            used |= linear.weight.ne(0).any(dim=1)
            if linear.bias is not None:
                used |= linear.bias.ne(0)
        if not bool(used.all()):
            kept[position] = used.nonzero().flatten()
    if not kept:
        return model, MlpChannels(width)
    compact = copy.deepcopy(model)
    layers = decoder_layers(compact)
    with torch.no_grad():
        for position, keep in kept.items():
            _shrink(_gated_mlp(layers[position]), len(keep), keep)
    return compact, MlpChannels(width, {position: keep.tolist() for position, keep in kept.items()})


def shrink_mlps(model: nn.Module, channels: MlpChannels) -> None:
    """Give the listed layers' MLPs their compact shapes (uninitialised), ready to load a compact state."""
    layers = decoder_layers(model)
    for position, kept in channels.kept.items():
        mlp = _gated_mlp(layers[position])
        if mlp is None:
            raise ValueError(f"layer {position} has no gated MLP (gate_proj, up_proj, down_proj) to compact")
        _shrink(mlp, len(kept), None)


def _shrink(mlp: Any, size: int, keep: torch.Tensor | None) -> None:
    for name in _ROWS:
        linear = getattr(mlp, name)
        resized = _resized(linear, size, linear.in_features)
        if keep is not None:
            resized.weight.copy_(linear.weight[keep])
            if linear.bias is not None:
                resized.bias.copy_(linear.bias[keep])
        setattr(mlp, name, resized)
    down = mlp.down_proj
    resized = _resized(down, down.out_features, size)
    if keep is not None:
        resized.weight.copy_(down.weight[:, keep])
        if down.bias is not None:
            resized.bias.copy_(down.bias)
    mlp.down_proj = resized
