import pytest
import torch

from blindtune.federation.aggregation import ClientUpdate
from blindtune.federation.strategies import (
    TIES,
    ConflictProjection,
    ConflictProjectionLoRA,
    FedAvg,
    FFALoRA,
    FLoRA,
    StrategyName,
    build_strategy,
    deconflicted_coefficients,
    ties_merge,
)
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


# Hand-made conflicting updates: entries 0 and 1 disagree in sign across clients, entry 3 has one voice.
CONFLICTING = [
    torch.tensor([3.0, -1.0, 0.5, 0.0]),
    torch.tensor([-1.0, 2.0, 0.5, -4.0]),
    torch.tensor([2.0, -2.0, -0.1, 0.0]),
]


def test_ties_merge_keeps_only_entries_agreeing_with_the_elected_sign():
    equal = [1 / 3] * 3
    merged = ties_merge(CONFLICTING, equal, density=1.0)
    assert torch.allclose(merged, torch.tensor([2.5, -1.5, 0.5, -4.0]))
    assert not torch.allclose(merged, torch.stack(CONFLICTING).mean(dim=0))  # FedAvg would give: [4/3, -1/3, 0.3, -4/3]
    # density 0.5 keeps each update's 2 largest entries: [3, -1, 0, 0], [0, 2, 0, -4], [2, -2, 0, 0]
    assert torch.allclose(ties_merge(CONFLICTING, equal, density=0.5), torch.tensor([2.5, -1.5, 0.0, -4.0]))
    # example weights elect the sign and weight the mean of the agreeing entries
    weighted = ties_merge(CONFLICTING, [0.5, 0.25, 0.25], density=1.0)
    assert weighted[0].item() == pytest.approx((0.5 * 3 + 0.25 * 2) / 0.75)
    assert weighted[1].item() == pytest.approx((0.5 * -1 + 0.25 * -2) / 0.75)  # mass -0.5: negative wins
    with pytest.raises(ValueError, match="NaN"):
        ties_merge([torch.tensor([float("nan")]), torch.tensor([1.0])], [0.5, 0.5], 1.0)
    with pytest.raises(ValueError, match="shape"):
        ties_merge([torch.zeros(2), torch.zeros(3)], [0.5, 0.5], 1.0)


def test_ties_strategy_merges_updates_relative_to_the_global_state():
    layers = AdapterConfig(kind=AdapterKind.LAYERS)
    strategy = build_strategy(StrategyName.TIES, layers, 0.0, ties_density=1.0, ties_scale=0.5)
    assert isinstance(strategy, TIES)
    global_state = {"layers.0.mlp.up_proj.weight": torch.ones(4)}
    updates = [ClientUpdate(i, {"layers.0.mlp.up_proj.weight": 1 + u}, 10) for i, u in enumerate(CONFLICTING)]
    result = strategy.aggregate(updates, global_state)
    expected = 1 + 0.5 * torch.tensor([2.5, -1.5, 0.5, -4.0])
    assert torch.allclose(result["layers.0.mlp.up_proj.weight"], expected)


def test_ties_lora_merges_the_factors_clients_continue_from():
    strategy = build_strategy(StrategyName.TIES, LORA, 0.0, ties_density=1.0)
    assert isinstance(strategy, TIES)
    state = _lora_state(2, 0)
    positive = {name: tensor + 1.0 for name, tensor in state.items()}
    opposite = {name: tensor - 0.5 for name, tensor in state.items()}  # a conflict in every entry
    clients = [ClientUpdate(1, positive, 2), ClientUpdate(2, opposite, 1), ClientUpdate(3, _lora_state(2, 5), 1)]
    merged = strategy.aggregate(clients, state)
    for name in (A, B):
        expected = state[name] + ties_merge([u.state[name] - state[name] for u in clients], [0.5, 0.25, 0.25], 1.0)
        assert merged[name].shape == state[name].shape and torch.allclose(merged[name], expected, atol=1e-6)


def test_ties_settings_are_validated():
    with pytest.raises(ValueError, match="ties_density"):
        build_strategy(StrategyName.TIES, LORA, 0.0, ties_density=0.0)
    with pytest.raises(ValueError, match="ties_scale"):
        build_strategy(StrategyName.TIES, AdapterConfig(kind=AdapterKind.LAYERS), 0.0, ties_scale=-1.0)


def test_conflict_projection_removes_the_conflicting_component_by_hand():
    # u1 = (1, 0), u2 = (-1, 1): <u1, u2> = -1. u1' = u1 + u2 / 2 = (0.5, 0.5); u2' = u2 + u1 = (0, 1).
    u1, u2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    strategy = ConflictProjection(AdapterConfig(kind=AdapterKind.LAYERS))
    base = {"w": torch.zeros(2)}
    merged = strategy.aggregate([ClientUpdate(1, {"w": u1}, 1), ClientUpdate(2, {"w": u2}, 1)], base)
    assert torch.allclose(merged["w"], torch.tensor([0.25, 0.75]))
    plain = FedAvg(AdapterConfig(kind=AdapterKind.LAYERS)).aggregate(
        [ClientUpdate(1, {"w": u1}, 1), ClientUpdate(2, {"w": u2}, 1)], base
    )
    assert torch.allclose(plain["w"], torch.tensor([0.0, 0.5]))  # the mean lets the first coordinate cancel


def test_conflict_projection_without_conflicts_is_the_weighted_mean():
    gram = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    assert deconflicted_coefficients(gram, [0.25, 0.75]) == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="NaN"):
        deconflicted_coefficients(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), [0.5, 0.5])


def test_conflict_projection_of_lora_is_exact_on_the_products():
    clients = [ClientUpdate(i, _lora_state(2, seed), n) for i, (seed, n) in enumerate([(1, 10), (2, 30), (5, 20)])]
    products = torch.stack([_product(u.state).flatten() for u in clients])
    weights = [1 / 6, 1 / 2, 1 / 3]
    expected = (torch.tensor(deconflicted_coefficients(products @ products.T, weights)) @ products).reshape(3, 4)
    strategy = build_strategy(StrategyName.CONFLICT_PROJECTION, LORA, 0.0)
    assert isinstance(strategy, ConflictProjectionLoRA)
    state = strategy.aggregate(clients, strategy.initial_global(_lora_state(2, 0)))
    assert state[A].shape == (6, 4)
    assert torch.allclose(state[B] @ state[A], expected, atol=1e-5)
    assert not torch.allclose(expected, (torch.tensor(weights) @ products).reshape(3, 4), atol=1e-3)
