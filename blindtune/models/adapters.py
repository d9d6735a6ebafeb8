"""Trainable adapters on chosen decoder layers, their portable state, and plug-in into the LLM.

Two kinds, chosen by `AdapterConfig.kind`:
- `layers`: the adapter layers' full parameters are trained and sent (Offsite-Tuning's default);
- `lora`: peft LoRA modules on those layers; only A/B matrices are trained and sent, and plug-in
  merges W += (alpha / r) * B @ A into the LLM's copy of each layer;
- `soft_prompt`: `prompt_length` trainable virtual tokens prepended to the input embeddings (see
  `blindtune.models.soft_prompt`); its state is the one tensor `soft_prompt.embeddings`, and plug-in
  puts the same prompt in front of the LLM's inputs (`plugged_in` yields the wrapped LLM).

An adapter's state is a flat {canonical name: tensor} dict (see `surgery.canonical_name`): the one
format that crosses party boundaries, serialised as safetensors or Flower ArrayRecords.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from blindtune.models.soft_prompt import SOFT_PROMPT_NAME, SoftPromptModel
from blindtune.models.surgery import canonical_name, decoder_layers, split_canonical_name

AdapterState = dict[str, torch.Tensor]


class AdapterKind(enum.StrEnum):
    LAYERS = "layers"
    LORA = "lora"
    SOFT_PROMPT = "soft_prompt"


@dataclass
class AdapterConfig:
    """What clients train.

    kind: `layers` (full parameters of the adapter layers) or `lora` (LoRA on them, via peft).
    lora_rank / lora_alpha: LoRA rank r and scale alpha (update = alpha / r * B @ A).
    lora_targets: linear modules inside each adapter layer that get LoRA.
    freeze_lora_a: FFA-LoRA: A keeps its shared (seeded) initialisation, only B is trained and sent.
    prompt_length: virtual tokens of a `soft_prompt` adapter (initialised from real tokens' embeddings;
        the adapter layers are then not trained).
    """

    kind: AdapterKind = AdapterKind.LORA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    freeze_lora_a: bool = False
    prompt_length: int = 5

    def __post_init__(self) -> None:
        self.kind = AdapterKind(self.kind)
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {self.prompt_length}")


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
    frozen: frozenset[str] = frozenset()  # adapter parameters loaded from the global state but not trained

    def named_adapter_parameters(self, include_frozen: bool = False) -> dict[str, nn.Parameter]:
        """Trainable adapter parameters by canonical name (with the frozen ones if asked)."""
        named = {}
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad and not (include_frozen and _portable(name) in self.frozen):
                continue
            canonical = SOFT_PROMPT_NAME if name == SOFT_PROMPT_NAME else canonical_name(name, self.source_of_position)
            if canonical is None:
                raise AssertionError(f"trainable parameter {name} is outside the adapter layers")
            named[_portable(canonical)] = parameter
        return named

    def state(self) -> AdapterState:
        """The trained part of the adapter: what a client sends back."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.named_adapter_parameters().items()}

    def load_state(self, state: AdapterState) -> None:
        """Load a complete adapter state (frozen parameters included)."""
        own = self.named_adapter_parameters(include_frozen=True)
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


def attach_adapter(
    model: nn.Module, source_of_position: dict[int, int], config: AdapterConfig, seed: int | None = None
) -> AdaptedModel:
    """Freeze `model` and make the adapter on the given layer positions trainable.

    `seed` fixes LoRA's random initialisation, so parties that never exchange A (FFA-LoRA) share it.
    A `soft_prompt` adapter returns `model` wrapped in a `SoftPromptModel` (layer positions unused),
    its prompt drawn from real tokens' embeddings (with `seed` when given).
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.kind is AdapterKind.SOFT_PROMPT:
        if seed is not None:
            torch.manual_seed(seed)
        return AdaptedModel(model=SoftPromptModel(model, config.prompt_length), source_of_position={})
    if config.kind is AdapterKind.LAYERS:
        layers = decoder_layers(model)
        for position in source_of_position:
            for parameter in layers[position].parameters():
                parameter.requires_grad_(True)
        return AdaptedModel(model=model, source_of_position=source_of_position)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
        layers_to_transform=sorted(source_of_position),
        layers_pattern="layers",
    )
    if seed is not None:
        torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora)
    frozen = set()
    if config.freeze_lora_a:
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
                frozen.add(_portable(name))
    return AdaptedModel(model=peft_model, source_of_position=source_of_position, frozen=frozenset(frozen))


def untrained_adapter_state(
    model: nn.Module, source_of_position: dict[int, int], config: AdapterConfig, seed: int
) -> AdapterState:
    """The complete starting adapter: the LLM's own layers (layers kind) or fresh LoRA with B = 0 (lora
    kind, A drawn from `seed`). LoRA wrapping is undone before returning.
    """
    adapted = attach_adapter(model, source_of_position, config, seed=seed)
    state = {n: p.detach().to("cpu", copy=True) for n, p in adapted.named_adapter_parameters(True).items()}
    if config.kind is AdapterKind.LORA:
        adapted.model.unload()  # type: ignore[operator]
    return state


def plug_in(
    llm: nn.Module,
    state: AdapterState,
    config: AdapterConfig,
    lora_scale: float | None = None,
    position_of: dict[int, int] | None = None,
) -> None:
    """Write an adapter state into a model, in place: replace layers, or merge LoRA products.

    lora_scale: multiplies B @ A; default alpha / r. States whose B already carries its scale
        (stacked FLoRA updates) pass 1.0.
    position_of: LLM layer index -> layer position in `llm` when it is not the LLM itself (an emulator).
    A soft prompt is not written into weights: `plugged_in` wraps the LLM with it instead.
    """
    if config.kind is AdapterKind.SOFT_PROMPT:
        raise IncompatibleAdapterError("a soft prompt is plugged in by wrapping the LLM: use plugged_in()")
    layers = _LayerView(decoder_layers(llm), position_of)
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
            assert isinstance(weight, torch.Tensor)
            scale = config.lora_alpha / lora_a.shape[0] if lora_scale is None else lora_scale
            delta = (lora_b.float() @ lora_a.float()) * scale
            if delta.shape != weight.shape:
                raise IncompatibleAdapterError(f"{name}: LoRA product {tuple(delta.shape)} != {tuple(weight.shape)}")
            if not torch.isfinite(delta).all():
                raise IncompatibleAdapterError(f"{name} holds NaN or Inf values")
            weight.add_(delta.to(weight.device, weight.dtype))


@contextmanager
def plugged_in(
    llm: nn.Module, state: AdapterState, config: AdapterConfig, lora_scale: float | None = None
) -> Iterator[nn.Module]:
    """Temporarily plug an adapter into the LLM (see `plug_in`); its original layers are restored on exit.

    A soft prompt yields the LLM wrapped with that prompt in front of its inputs (the LLM is unchanged).
    """
    if config.kind is AdapterKind.SOFT_PROMPT:
        yield soft_prompt_plugged(llm, state)
        return
    layers = decoder_layers(llm)
    touched = sorted({split_canonical_name(name)[0] for name in state})
    if touched and touched[-1] >= len(layers):
        raise IncompatibleAdapterError(f"adapter names layer {touched[-1]}, the LLM has {len(layers)} layers")
    originals = {i: {k: v.clone() for k, v in layers[i].state_dict().items()} for i in touched}
    try:
        plug_in(llm, state, config, lora_scale)
        yield llm
    finally:
        for index, original in originals.items():
            layers[index].load_state_dict(original)


def soft_prompt_plugged(llm: nn.Module, state: AdapterState) -> SoftPromptModel:
    """The LLM with a soft-prompt state in front of its inputs; a zero-length prompt changes nothing."""
    causal: Any = llm
    table: torch.Tensor = causal.get_input_embeddings().weight
    prompt = state.get(SOFT_PROMPT_NAME)
    if prompt is None or set(state) != {SOFT_PROMPT_NAME}:
        raise IncompatibleAdapterError(f"a soft-prompt adapter holds exactly {SOFT_PROMPT_NAME!r}, got {sorted(state)}")
    if prompt.dim() != 2 or prompt.shape[1] != table.shape[1]:
        raise IncompatibleAdapterError(f"{SOFT_PROMPT_NAME}: shape {tuple(prompt.shape)} != (length, {table.shape[1]})")
    check_compatible(state, {SOFT_PROMPT_NAME: tuple(prompt.shape)})
    wrapped = SoftPromptModel(llm, prompt=prompt.to(table.device, table.dtype))
    wrapped.soft_prompt.requires_grad_(False)
    return wrapped


class _LayerView:
    """Decoder layers indexed by LLM layer index, whatever their position in this model."""

    def __init__(self, layers: nn.ModuleList, position_of: dict[int, int] | None) -> None:
        self._layers = layers
        self._position_of = position_of

    def __len__(self) -> int:
        return len(self._layers) if self._position_of is None else max(self._position_of) + 1

    def __getitem__(self, index: int) -> nn.Module:
        if self._position_of is None:
            return self._layers[index]
        if index not in self._position_of:
            raise IncompatibleAdapterError(f"layer {index} is not in this model")
        return self._layers[self._position_of[index]]
