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
- `ties`: interference-resolving merge of the client *updates* (client state minus the global state)
  instead of their mean (TIES-merging, Yadav et al., 2023): each client's update is trimmed to its
  `ties_density` largest-magnitude entries (per tensor), every entry elects the sign with the larger
  example-weighted mass, and only the entries agreeing with it are averaged (weighted by examples);
  the global state moves by `ties_scale` x that merge. Under label skew clients' updates point in
  conflicting directions and plain averaging lets them cancel. With LoRA it merges the factors the
  clients train, as FedAvg averages them, and clients continue from the merged factors. Merging the
  products B_i A_i instead (exact, but kept as FLoRA-style stacked factors, so each round's clients
  start a fresh LoRA on a merged base) was measured in FedProxy: the tuned proxy was as good, but
  its update transferred to the LLM far worse (plug-in 30.5% against 61.0% on the factors, both one
  seed on test at commit 6efebb4, now stale: the factor run gives 54.0% on main;
  `benchmarks/results/acceptance/README.md`).
- `conflict_projection`: removes the conflicting directions between client updates before averaging
  them (gradient surgery, PCGrad; Yu et al., 2020): wherever <u_i, u_j> < 0, client i's update loses its
  component along u_j (u_i <- u_i - <u_i, u_j> / ||u_j||^2 u_j, every j in turn, cyclically from i + 1),
  then the projected updates are averaged by examples. Per tensor (per LoRA module). Unlike TIES it
  never works entry by entry: every projected update stays a linear combination of the clients'
  updates, so with LoRA the merge of the products B_i A_i is exact as FLoRA-style stacked factors, and
  only the clients' Gram matrix, r x r products of the factors, is computed. (On the factors it would
  change nothing in FedProxy's runs: their factor updates never conflicted.) Measured in FedProxy: the
  best tuned proxy, but, like every stacked merge there, an update that transfers poorly to the LLM.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from blindtune.config import FederationConfig


class StrategyName(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FFA_LORA = "ffa_lora"
    FLORA = "flora"
    TIES = "ties"
    CONFLICT_PROJECTION = "conflict_projection"


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
        stacked = dict(global_state)
        for name in self.template:
            if ".lora_A." not in name:
                continue
            b_name = name.replace(".lora_A.", ".lora_B.")
            a_parts = [stacked[name]] if name in stacked else []
            b_parts = [stacked[b_name]] if b_name in stacked else []
            factors = [
                (u.state[name], u.state[b_name] * (self.adapter.lora_alpha / u.state[name].shape[0])) for u in updates
            ]
            for (a, b), coefficient in zip(factors, self.product_coefficients(factors, updates), strict=True):
                a_parts.append(a)
                b_parts.append(b * coefficient)
            stacked[name] = torch.cat(a_parts, dim=0)
            stacked[b_name] = torch.cat(b_parts, dim=1)
        return stacked

    def product_coefficients(
        self, factors: list[tuple[torch.Tensor, torch.Tensor]], updates: list[ClientUpdate]
    ) -> list[float]:
        """The multiple of each client's (scaled) product B_i A_i added to the global state: its share of examples."""
        return example_weights(updates)

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


def ties_merge(updates: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-merge same-shaped client updates: trim each to its `density` share of largest-magnitude
    entries, elect each entry's sign by weighted mass, average the agreeing (nonzero) entries by weight."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"ties_merge needs one weight per update, got {len(updates)} updates, {len(weights)} weights")
    if not 0 < density <= 1:
        raise ValueError(f"ties density must be in (0, 1], got {density}")
    shape = updates[0].shape
    for update in updates:
        if update.shape != shape:
            raise ValueError(f"ties_merge: update shape {tuple(update.shape)} != {tuple(shape)}")
        if not torch.isfinite(update).all():
            raise ValueError("ties_merge: an update holds NaN or Inf values")
    stacked = torch.stack([u.double().flatten() for u in updates])
    keep = max(1, round(density * stacked.shape[1]))
    if keep < stacked.shape[1]:
        threshold_index = stacked.abs().topk(keep, dim=1).indices
        trimmed = torch.zeros_like(stacked).scatter_(1, threshold_index, stacked.gather(1, threshold_index))
    else:
        trimmed = stacked
    weight = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
    elected = torch.sign((weight * trimmed).sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    mass = (weight * agrees).sum(dim=0)
    merged = (weight * trimmed * agrees).sum(dim=0) / mass.clamp(min=torch.finfo(torch.float64).tiny)
    return merged.reshape(shape).to(updates[0].dtype)


def _check_ties_settings(density: float, scale: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"federation.ties_density must be in (0, 1], got {density}")
    if scale <= 0:
        raise ValueError(f"federation.ties_scale must be > 0, got {scale}")


class TIES(FedAvg):
    """TIES-merging of the client updates, tensor by tensor (layer weights, soft prompts, LoRA factors)."""

    name = StrategyName.TIES

    def __init__(self, adapter: AdapterConfig, density: float, scale: float) -> None:
        _check_ties_settings(density, scale)
        super().__init__(adapter)
        self.density, self.scale = density, scale

    def aggregate(self, updates: list[ClientUpdate], global_state: AdapterState) -> AdapterState:
        weights = example_weights(updates)
        merged = dict(global_state)
        for name in self.returned_names(global_state):
            base = global_state[name].double()
            deltas = [u.state[name].double() - base for u in updates]
            merged[name] = (base + self.scale * ties_merge(deltas, weights, self.density)).to(global_state[name].dtype)
        return merged


def example_weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def deconflicted_coefficients(gram: torch.Tensor, weights: list[float]) -> list[float]:
    """c with sum_k c_k u_k = the example-weighted mean of the conflict-projected updates (see
    `conflict_projection` above), from the updates' Gram matrix gram[i, j] = <u_i, u_j> alone."""
    n = gram.shape[0]
    if gram.shape != (n, n) or len(weights) != n:
        raise ValueError(f"need an n x n Gram matrix and n weights, got {tuple(gram.shape)} and {len(weights)}")
    if not torch.isfinite(gram).all():
        raise ValueError("conflict_projection: an update holds NaN or Inf values")
    gram = gram.double()
    # Row i: u_i' as a combination of the original updates; <u_i', u_j> = (C @ gram)[i, j].
    combination = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in ((i + step) % n for step in range(1, n)):
            inner = combination[i] @ gram[:, j]
            if inner < 0 and gram[j, j] > 0:
                combination[i, j] -= inner / gram[j, j]
    return (torch.tensor(weights, dtype=torch.float64) @ combination).tolist()


class ConflictProjection(FedAvg):
    """Conflict projection of dense client updates (layer adapters, soft prompts, any full tensors)."""

    name = StrategyName.CONFLICT_PROJECTION

    def aggregate(self, updates: list[ClientUpdate], global_state: AdapterState) -> AdapterState:
        weights = example_weights(updates)
        merged = dict(global_state)
        for name in self.returned_names(global_state):
            base = global_state[name].double()
            deltas = torch.stack([(u.state[name].double() - base).flatten() for u in updates])
            coefficients = torch.tensor(deconflicted_coefficients(deltas @ deltas.T, weights), dtype=torch.float64)
            merged[name] = (base + (coefficients @ deltas).reshape(base.shape)).to(global_state[name].dtype)
        return merged


class ConflictProjectionLoRA(FLoRA):
    """Conflict projection of the clients' LoRA products, kept exactly as stacked factors (see above)."""

    name = StrategyName.CONFLICT_PROJECTION

    def product_coefficients(
        self, factors: list[tuple[torch.Tensor, torch.Tensor]], updates: list[ClientUpdate]
    ) -> list[float]:
        # <B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T)): r_i x r_j matrices, never the dense products.
        exact = [(a.double(), b.double()) for a, b in factors]
        gram = torch.tensor(
            [[float(((b_i.T @ b_j) * (a_i @ a_j.T)).sum()) for a_j, b_j in exact] for a_i, b_i in exact],
            dtype=torch.float64,
        )
        return deconflicted_coefficients(gram, example_weights(updates))


def build_strategy(
    name: StrategyName,
    adapter: AdapterConfig,
    proximal_mu: float,
    ties_density: float = 0.2,
    ties_scale: float = 1.0,
) -> FedAvg:
    if name is StrategyName.FEDPROX:
        return FedProx(adapter, proximal_mu)
    if name is StrategyName.FFA_LORA:
        return FFALoRA(adapter)
    if name is StrategyName.FLORA:
        return FLoRA(adapter)
    if name is StrategyName.TIES:
        return TIES(adapter, ties_density, ties_scale)
    if name is StrategyName.CONFLICT_PROJECTION:
        if adapter.kind is AdapterKind.LORA:
            return ConflictProjectionLoRA(adapter)
        return ConflictProjection(adapter)
    return FedAvg(adapter)


def configured_strategy(federation: FederationConfig, adapter: AdapterConfig) -> FedAvg:
    """The strategy a run's `federation` section selects, with all of its settings."""
    return build_strategy(
        federation.strategy, adapter, federation.proximal_mu, federation.ties_density, federation.ties_scale
    )
