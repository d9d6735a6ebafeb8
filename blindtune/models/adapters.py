"""Trainable adapters on chosen decoder layers, their portable state, and plug-in into the LLM.

Two kinds, chosen by `AdapterConfig.kind`:
- `layers`: the adapter layers' full parameters are trained and sent (Offsite-Tuning's default);
- `lora`: peft LoRA modules on those layers; only A/B matrices are trained and sent, and plug-in
  merges W += (alpha / r) * B @ A into the LLM's copy of each layer.

An adapter's state is a flat {canonical name: tensor} dict (see `surgery.canonical_name`): the one
format that crosses party boundaries, serialised as safetensors or Flower ArrayRecords.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from blindtune.models.surgery import canonical_name, decoder_layers, split_canonical_name

AdapterState = dict[str, torch.Tensor]


class AdapterKind(enum.StrEnum):
    LAYERS = "layers"
    LORA = "lora"


@dataclass
class AdapterConfig:
    """What clients train.

    kind: `layers` (full parameters of the adapter layers) or `lora` (LoRA on them, via peft).
    lora_rank / lora_alpha: LoRA rank r and scale alpha (update = alpha / r * B @ A).
    lora_targets: linear modules inside each adapter layer that get LoRA.
    """

    kind: AdapterKind = AdapterKind.LORA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        self.kind = AdapterKind(self.kind)
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")


class IncompatibleAdapterError(ValueError):
    """An adapter state does not fit the model it is loaded into (names or shapes differ)."""


_PEFT_ADAPTER_NAME = ".default."


def _portable(name: str) -> str:
    # peft inserts the adapter's name ("default") into parameter names; it is meaningless across parties.
    return name.replace(_PEFT_ADAPTER_NAME, ".")


@dataclass
class AdaptedModel:
    """A model whose only trainable parameters are the adapter on `source_of_position`'s layers."""

    model: nn.Module
    source_of_position: dict[int, int]  # layer position in `model` -> LLM layer index

    def named_adapter_parameters(self) -> dict[str, nn.Parameter]:
        named = {}
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            canonical = canonical_name(name, self.source_of_position)
            if canonical is None:
                raise AssertionError(f"trainable parameter {name} is outside the adapter layers")
            named[_portable(canonical)] = parameter
        return named

    def state(self) -> AdapterState:
        return {name: p.detach().to("cpu", copy=True) for name, p in self.named_adapter_parameters().items()}

    def load_state(self, state: AdapterState) -> None:
        own = self.named_adapter_parameters()
        check_compatible(state, {name: tuple(p.shape) for name, p in own.items()})
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state[name])


def check_compatible(state: AdapterState, expected_shapes: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected_shapes) - set(state))
    unexpected = sorted(set(state) - set(expected_shapes))
    if missing or unexpected:
        raise IncompatibleAdapterError(
            f"adapter does not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, shape in expected_shapes.items():
        if tuple(state[name].shape) != shape:
            raise IncompatibleAdapterError(f"{name}: shape {tuple(state[name].shape)} != expected {shape}")
        if not torch.isfinite(state[name]).all():
            raise IncompatibleAdapterError(f"{name} holds NaN or Inf values")


def attach_adapter(model: nn.Module, source_of_position: dict[int, int], config: AdapterConfig) -> AdaptedModel:
    """Freeze `model` and make the adapter on the given layer positions trainable."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.kind is AdapterKind.LAYERS:
        layers = decoder_layers(model)
        for position in source_of_position:
            for parameter in layers[position].parameters():
                parameter.requires_grad_(True)
        return AdaptedModel(model=model, source_of_position=source_of_position)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
        layers_to_transform=sorted(source_of_position),
        layers_pattern="layers",
    )
    return AdaptedModel(model=get_peft_model(model, lora), source_of_position=source_of_position)


def untrained_adapter_state(
    model: nn.Module, source_of_position: dict[int, int], config: AdapterConfig, seed: int
) -> AdapterState:
    """The starting adapter: the LLM's own layers (layers kind) or fresh LoRA with B = 0 (lora kind).

    Built on a throw-away copy-free pass: LoRA wrapping is undone before returning.
    """
    torch.manual_seed(seed)
    adapted = attach_adapter(model, source_of_position, config)
    state = adapted.state()
    if config.kind is AdapterKind.LORA:
        adapted.model.unload()  # type: ignore[operator]
    return state


def plug_in(llm: nn.Module, state: AdapterState, config: AdapterConfig) -> None:
    """Write an adapter state into the LLM, in place: replace layers, or merge LoRA products."""
    layers = decoder_layers(llm)
    with torch.no_grad():
        if config.kind is AdapterKind.LAYERS:
            expected = {
                f"layers.{index}.{name}": tuple(p.shape)
                for index in {split_canonical_name(n)[0] for n in state}
                if index < len(layers)
                for name, p in layers[index].named_parameters()
            }
            check_compatible(state, expected)
            for name, tensor in state.items():
                index, inner = split_canonical_name(name)
                layers[index].get_parameter(inner).copy_(tensor)
            return
        for name, lora_a in state.items():
            if ".lora_A." not in name:
                continue
            lora_b = state.get(name.replace(".lora_A.", ".lora_B."))
            if lora_b is None:
                raise IncompatibleAdapterError(f"{name} has no matching lora_B")
            index, inner = split_canonical_name(name)
            if index >= len(layers):
                raise IncompatibleAdapterError(f"{name}: the LLM has only {len(layers)} layers")
            module_path = inner.split(".lora_A.")[0]
            weight = layers[index].get_submodule(module_path).weight
            delta = (lora_b.float() @ lora_a.float()) * (config.lora_alpha / lora_a.shape[0])
            if delta.shape != weight.shape:
                raise IncompatibleAdapterError(f"{name}: LoRA product {tuple(delta.shape)} != {tuple(weight.shape)}")
            if not torch.isfinite(delta).all():
                raise IncompatibleAdapterError(f"{name} holds NaN or Inf values")
            weight.add_(delta.to(weight.dtype))


@contextmanager
def plugged_in(llm: nn.Module, state: AdapterState, config: AdapterConfig) -> Iterator[nn.Module]:
    """Temporarily plug an adapter into the LLM; its original layers are restored on exit."""
    layers = decoder_layers(llm)
    touched = sorted({split_canonical_name(name)[0] for name in state})
    if touched and touched[-1] >= len(layers):
        raise IncompatibleAdapterError(f"adapter names layer {touched[-1]}, the LLM has {len(layers)} layers")
    originals = {i: {k: v.clone() for k, v in layers[i].state_dict().items()} for i in touched}
    try:
        plug_in(llm, state, config)
        yield llm
    finally:
        for index, original in originals.items():
            layers[index].load_state_dict(original)
