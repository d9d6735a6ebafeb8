import pytest
import torch

from blindtune.federation.aggregation import ClientUpdate
from blindtune.federation.strategies import FedAvg, FFALoRA, FLoRA, StrategyName, build_strategy
from blindtune.models.adapters import AdapterConfig, AdapterKind

A = "layers.0.self_attn.q_proj.lora_A.weight"
B = "layers.0.self_attn.q_proj.lora_B.weight"
LORA = AdapterConfig(kind=AdapterKind.LORA, lora_rank=2, lora_alpha=4.0, lora_targets=["q_proj"])


def _lora_state(rank: int, seed: int, out: int = 3, inp: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, inp, generator=generator), B: torch.randn(out, rank, generator=generator)}


def _product(state, alpha=4.0):
    return state[B] @ state[A] * (alpha / state[A].shape[0])


def test_naive_fedavg_of_factors_is_not_the_mean_of_products_but_flora_is():
    clients = [ClientUpdate(1, _lora_state(2, 1), 10), ClientUpdate(2, _lora_state(2, 2), 30)]
    exact = sum(_product(u.state) * (u.num_examples / 40) for u in clients)
    naive = FedAvg(LORA).aggregate(clients, {})
    assert not torch.allclose(_product(naive), exact, atol=1e-3)

    flora = FLoRA(LORA)
    flora.initial_global(_lora_state(2, 0))
    stacked = flora.aggregate(clients, flora.initial_global(_lora_state(2, 0)))
    assert stacked[A].shape == (4, 4) and stacked[B].shape == (3, 4)
    assert torch.allclose(stacked[B] @ stacked[A], exact, atol=1e-5)


def test_flora_stacks_heterogeneous_ranks_and_accumulates_rounds():
    flora = FLoRA(LORA)
    state = flora.initial_global(_lora_state(2, 0))
    round_one = [ClientUpdate(1, _lora_state(1, 1), 1), ClientUpdate(2, _lora_state(4, 2), 3)]
    state = flora.aggregate(round_one, state)
    expected = _product(round_one[0].state) * 0.25 + _product(round_one[1].state) * 0.75
    assert state[A].shape[0] == 5 and torch.allclose(state[B] @ state[A], expected, atol=1e-5)
    round_two = [ClientUpdate(1, _lora_state(2, 3), 1)]
    state = flora.aggregate(round_two, state)
    assert state[A].shape[0] == 7
    assert torch.allclose(state[B] @ state[A], expected + _product(round_two[0].state), atol=1e-5)


def test_flora_screens_inconsistent_ranks_and_nan():
    flora = FLoRA(LORA)
    global_state = flora.initial_global(_lora_state(2, 0))
    good = [ClientUpdate(i, _lora_state(1 + i % 3, i), 5) for i in range(3)]
    bad_rank = ClientUpdate(7, {A: torch.randn(2, 4), B: torch.randn(3, 3)}, 5)
    nan = ClientUpdate(8, {A: torch.randn(2, 4), B: torch.full((3, 2), float("nan"))}, 5)
    kept, rejected = flora.screen([*good, bad_rank, nan], global_state, 10.0)
    assert [u.node_id for u in kept] == [0, 1, 2]
    assert {r.node_id for r in rejected} == {7, 8}


def test_fedavg_is_example_weighted():
    clients = [ClientUpdate(1, _lora_state(2, 1), 1), ClientUpdate(2, _lora_state(2, 2), 3)]
    result = FedAvg(LORA).aggregate(clients, {})
    assert torch.allclose(result[A], clients[0].state[A] * 0.25 + clients[1].state[A] * 0.75)


def test_ffa_lora_keeps_a_and_averages_b_only():
    strategy = FFALoRA(LORA)
    assert strategy.adapter.freeze_lora_a and strategy.returned_names(_lora_state(2, 0)) == [B]
    global_state = _lora_state(2, 0)
    clients = [ClientUpdate(1, {B: torch.ones(3, 2)}, 1), ClientUpdate(2, {B: torch.zeros(3, 2)}, 1)]
    kept, rejected = strategy.screen(clients, global_state, 10.0)
    assert len(kept) == 2 and not rejected
    result = strategy.aggregate(kept, global_state)
    assert torch.equal(result[A], global_state[A])
    assert torch.allclose(result[B], torch.full((3, 2), 0.5))


def test_strategy_construction_rules():
    with pytest.raises(ValueError, match="fedprox"):
        build_strategy(StrategyName.FEDPROX, LORA, 0.0)
    assert build_strategy(StrategyName.FEDPROX, LORA, 0.1).proximal_mu == 0.1
    with pytest.raises(ValueError, match="LoRA"):
        build_strategy(StrategyName.FFA_LORA, AdapterConfig(kind=AdapterKind.LAYERS), 0.0)
    with pytest.raises(ValueError, match="flora"):
        FedAvg(LORA).client_adapter(rank=4)
    assert FLoRA(LORA).client_adapter(rank=4).lora_rank == 4
