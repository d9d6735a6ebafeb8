"""Aggregation strategies for federated adapter training, selected by `federation.strategy`.

- `fedavg`: example-weighted mean of the client adapters (McMahan et al., 2017).
- `fedprox`: FedAvg on the server; clients add mu/2 * ||w - w_global||^2 to their loss (Li et al., 2020).
- `ffa_lora`: LoRA with A frozen at a shared seeded initialisation; clients train and send only B, the
  server averages B. Half the upload of LoRA-FedAvg (Sun et al., 2024).
- `flora`: clients may use different LoRA ranks. Averaging A and B separately is not the average of the
  products (mean(B) @ mean(A) != mean(B @ A)); FLoRA stacks instead: A = [A_1; ...; A_n],
  B = [p_1 s_1 B_1, ..., p_n s_n B_n] (s_i = alpha / r_i), so B @ A = sum_i p_i s_i B_i A_i exactly
  (Wang et al., 2024). The global state is the stack of every round's products; a client merges it
  into its copy of the adapter layers and trains a fresh LoRA of its own rank on top.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from blindtune.federation.aggregation import ClientUpdate, Rejection, fedavg, screen, split_outliers
from blindtune.models.adapters import (
    AdaptedModel,
    AdapterConfig,
    AdapterKind,
    AdapterState,
    IncompatibleAdapterError,
    attach_adapter,
    check_compatible,
    plug_in,
    plugged_in,
)


class StrategyName(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FFA_LORA = "ffa_lora"
    FLORA = "flora"


class FedAvg:
    """Plain FedAvg; the base of the others."""

    name = StrategyName.FEDAVG
    proximal_mu = 0.0

    def __init__(self, adapter: AdapterConfig) -> None:
        self.adapter = adapter

    def client_adapter(self, rank: int | None) -> AdapterConfig:
        """The adapter a client trains (its own LoRA rank where the strategy allows it)."""
        if rank is not None and rank != self.adapter.lora_rank:
            raise ValueError(f"{self.name} needs one LoRA rank for all clients; use flora for per-client ranks")
        return self.adapter

    def initial_global(self, full_initial: AdapterState) -> AdapterState:
        return full_initial

    def prepare_client(
        self, model: nn.Module, global_state: AdapterState, layer_map: dict[int, int], rank: int | None, seed: int
    ) -> AdaptedModel:
        adapted = attach_adapter(model, layer_map, self.client_adapter(rank), seed=seed)
        adapted.load_state(global_state)
        return adapted

    def returned_names(self, global_state: AdapterState) -> list[str]:
        return list(global_state)

    def screen(
        self, updates: list[ClientUpdate], global_state: AdapterState, max_norm_ratio: float
    ) -> tuple[list[ClientUpdate], list[Rejection]]:
        reference = {name: global_state[name] for name in self.returned_names(global_state)}
        return screen(updates, reference, max_norm_ratio)

    def aggregate(self, updates: list[ClientUpdate], global_state: AdapterState) -> AdapterState:
        # Parameters the clients did not train (FFA-LoRA's A) keep their global value.
        return {**global_state, **fedavg(updates)}

    @contextmanager
    def plugged_in(self, llm: nn.Module, global_state: AdapterState) -> Iterator[nn.Module]:
        with plugged_in(llm, global_state, self.adapter) as adapted:
            yield adapted


class FedProx(FedAvg):
    name = StrategyName.FEDPROX

    def __init__(self, adapter: AdapterConfig, proximal_mu: float) -> None:
        super().__init__(adapter)
        if proximal_mu <= 0:
            raise ValueError("fedprox needs federation.proximal_mu > 0")
        self.proximal_mu = proximal_mu


class FFALoRA(FedAvg):
    name = StrategyName.FFA_LORA

    def __init__(self, adapter: AdapterConfig) -> None:
        if adapter.kind is not AdapterKind.LORA:
            raise ValueError("ffa_lora needs a LoRA adapter")
        super().__init__(dataclasses.replace(adapter, freeze_lora_a=True))

    def returned_names(self, global_state: AdapterState) -> list[str]:
        return [name for name in global_state if ".lora_A." not in name]


class FLoRA(FedAvg):
    name = StrategyName.FLORA

    def __init__(self, adapter: AdapterConfig) -> None:
        if adapter.kind is not AdapterKind.LORA:
            raise ValueError("flora needs a LoRA adapter")
        super().__init__(adapter)
        self.template: AdapterState = {}

    def client_adapter(self, rank: int | None) -> AdapterConfig:
        return self.adapter if rank is None else dataclasses.replace(self.adapter, lora_rank=rank)

    def initial_global(self, full_initial: AdapterState) -> AdapterState:
        self.template = full_initial  # names and full shapes; the rank dimension varies per client
        return {}

    def prepare_client(
        self, model: nn.Module, global_state: AdapterState, layer_map: dict[int, int], rank: int | None, seed: int
    ) -> AdaptedModel:
        if global_state:
            plug_in(model, global_state, self.adapter, lora_scale=1.0, position_of={v: k for k, v in layer_map.items()})
        return attach_adapter(model, layer_map, self.client_adapter(rank), seed=seed)

    def screen(
        self, updates: list[ClientUpdate], global_state: AdapterState, max_norm_ratio: float
    ) -> tuple[list[ClientUpdate], list[Rejection]]:
        shaped: list[ClientUpdate] = []
        rejected: list[Rejection] = []
        for update in updates:
            try:
                check_compatible(update.state, self._expected_shapes(update.state))
            except IncompatibleAdapterError as error:
                rejected.append(Rejection(update.node_id, str(error)))
                continue
            shaped.append(update)
        # Ranks differ, so compare the products B @ A (what plug-in adds) rather than the factors.
        norms = [_product_norm(u.state) for u in shaped]
        return split_outliers(shaped, norms, max_norm_ratio, rejected)

    def _expected_shapes(self, state: AdapterState) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, template in self.template.items():
            a_name = name.replace(".lora_B.", ".lora_A.")
            rank = state[a_name].shape[0] if a_name in state and state[a_name].dim() == 2 else template.shape[0]
            shapes[name] = (rank, template.shape[1]) if ".lora_A." in name else (template.shape[0], rank)
        return shapes

    def aggregate(self, updates: list[ClientUpdate], global_state: AdapterState) -> AdapterState:
        total = sum(u.num_examples for u in updates)
        stacked = dict(global_state)
        for name in self.template:
            if ".lora_A." not in name:
                continue
            b_name = name.replace(".lora_A.", ".lora_B.")
            a_parts = [stacked[name]] if name in stacked else []
            b_parts = [stacked[b_name]] if b_name in stacked else []
            for update in updates:
                a, b = update.state[name], update.state[b_name]
                weight = (update.num_examples / total) * (self.adapter.lora_alpha / a.shape[0])
                a_parts.append(a)
                b_parts.append(b * weight)
            stacked[name] = torch.cat(a_parts, dim=0)
            stacked[b_name] = torch.cat(b_parts, dim=1)
        return stacked

    @contextmanager
    def plugged_in(self, llm: nn.Module, global_state: AdapterState) -> Iterator[nn.Module]:
        with plugged_in(llm, global_state, self.adapter, lora_scale=1.0) as adapted:
            yield adapted


def _product_norm(state: AdapterState) -> float:
    total = 0.0
    for name, a in state.items():
        if ".lora_A." in name:
            total += float((state[name.replace(".lora_A.", ".lora_B.")].float() @ a.float()).pow(2).sum())
    return total**0.5


def build_strategy(name: StrategyName, adapter: AdapterConfig, proximal_mu: float) -> FedAvg:
    if name is StrategyName.FEDPROX:
        return FedProx(adapter, proximal_mu)
    if name is StrategyName.FFA_LORA:
        return FFALoRA(adapter)
    if name is StrategyName.FLORA:
        return FLoRA(adapter)
    return FedAvg(adapter)
