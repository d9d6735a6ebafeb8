import pytest
import torch

from blindtune.models import tiny_model
from blindtune.models.artefact import build_from_parts, describe, unique_state_dict
from blindtune.models.compression import (
    CompressionConfig,
    CompressionError,
    CompressionPlan,
    LogitDistillConfig,
    build_proxy,
    decoder_parameters,
    gather,
    measure_importance,
    plan_compression,
    plug_in_update,
    plugged_in_update,
    prepare_proxy,
    proxy_layer_state,
    proxy_update,
    scatter_add,
    solve_shape,
)
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import decoder_layers

TEXTS = [
    f"the {w} of a {v} thing that is often found near water number {i}"
    for i, (w, v) in enumerate(
        [("part", "small"), ("side", "large"), ("edge", "green"), ("top", "old"), ("end", "young"), ("base", "red")] * 4
    )
]


@pytest.fixture(scope="module")
def llm():
    return tiny_model(num_layers=6, hidden_size=64, seed=1)


def _plan(llm, **overrides):
    config = CompressionConfig(**{"target_fraction": 0.35, "distill": None, **overrides})
    importance = measure_importance(llm.model, llm.tokenizer, TEXTS, max_length=16)
    return plan_compression(llm.model, importance, solve_shape(llm.model, config))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_plan_keeps_ends_whole_kv_groups_and_meets_the_target(llm):
    plan = _plan(llm)
    assert plan.kept_layers[0] == 0 and plan.kept_layers[-1] == 5 and plan.num_proxy_layers == 4
    for kv, queries in zip(plan.kv_heads, plan.query_heads, strict=True):
        assert [q // 2 for q in queries] == [g for g in kv for _ in range(len(queries) // len(kv))]
    proxy = build_proxy(llm.model, plan)
    share = decoder_parameters(proxy) / decoder_parameters(llm.model)
    assert share == pytest.approx(0.35, abs=0.03)
    logits = _logits(proxy, torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, proxy.config.vocab_size) and torch.isfinite(logits).all()


def test_pruned_indices_round_trip_between_llm_and_proxy(llm):
    plan = _plan(llm)
    proxy = build_proxy(llm.model, plan)
    llm_layers, proxy_layers = decoder_layers(llm.model), decoder_layers(proxy)
    for position, source in enumerate(plan.kept_layers):
        for name, tensor in llm_layers[source].state_dict().items():
            rows, columns = plan.row_and_column_indices(position, name)
            kept = gather(tensor, rows, columns)
            assert torch.equal(kept, proxy_layers[position].state_dict()[name]), name
            # Scattering the proxy tensor into zeros puts each value back at its original index, only there.
            restored = torch.zeros_like(tensor)
            scatter_add(restored, rows, columns, kept)
            assert torch.equal(gather(restored, rows, columns), kept), name
            assert restored.count_nonzero() == kept.count_nonzero(), name
    query_rows, _ = plan.row_and_column_indices(0, "self_attn.q_proj.weight")
    assert query_rows.tolist()[:16] == list(range(plan.query_heads[0][0] * 16, plan.query_heads[0][0] * 16 + 16))


def test_plug_in_of_a_zero_update_returns_the_llm_exactly(llm):
    plan = _plan(llm)
    before = {k: v.clone() for k, v in llm.model.state_dict().items()}
    zero = {name: torch.zeros_like(t) for name, t in proxy_layer_state(build_proxy(llm.model, plan)).items()}
    plug_in_update(llm.model, plan, zero)
    assert all(torch.equal(before[k], v) for k, v in llm.model.state_dict().items())


def test_uncompressed_proxy_update_plugs_in_to_the_same_function(llm):
    plan = _plan(llm, target_fraction=1.0, num_layers=6)
    proxy = build_proxy(llm.model, plan)
    initial = proxy_layer_state(proxy)
    with torch.no_grad():
        for parameter in decoder_layers(proxy).parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    update = proxy_update(proxy, initial)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = _logits(llm.model, ids)
    with plugged_in_update(llm.model, plan, update) as plugged:
        assert torch.allclose(_logits(plugged, ids), _logits(proxy, ids), atol=1e-4)
    assert torch.equal(_logits(llm.model, ids), before)


def test_plug_in_touches_only_kept_indices_and_rejects_bad_updates(llm):
    plan = _plan(llm)
    proxy = build_proxy(llm.model, plan)
    update = {name: torch.ones_like(t) for name, t in proxy_layer_state(proxy).items()}
    before = {k: v.clone() for k, v in llm.model.state_dict().items()}
    with plugged_in_update(llm.model, plan, update) as plugged:
        changed = {int(k.split(".")[2]) for k, v in plugged.state_dict().items() if not torch.equal(before[k], v)}
        assert changed == set(plan.kept_layers)
    bad_shape = dict(update, **{"layers.0.mlp.down_proj.weight": torch.ones(3, 3)})
    with pytest.raises(CompressionError, match=r"down_proj.*shape"):
        plug_in_update(llm.model, plan, bad_shape)
    nan = dict(
        update, **{"layers.1.self_attn.q_proj.weight": update["layers.1.self_attn.q_proj.weight"] * float("nan")}
    )
    with pytest.raises(CompressionError, match="NaN"):
        plug_in_update(llm.model, plan, nan)
    with pytest.raises(CompressionError, match="only 4 layers"):
        plug_in_update(llm.model, plan, {"layers.7.mlp.up_proj.weight": torch.ones(1)})


def test_plan_validation_and_json_round_trip(llm):
    plan = _plan(llm)
    assert CompressionPlan.from_json(plan.to_json()) == plan
    with pytest.raises(CompressionError, match="query heads of each kept KV group"):
        CompressionPlan(6, 4, 2, 16, 128, (0, 5), ((0,), (1,)), ((2,), (2,)), ((1,), (1,)))
    with pytest.raises(CompressionError, match="as many"):
        CompressionPlan(6, 4, 2, 16, 128, (0, 5), ((0,), (0, 1)), ((0,), (0, 2)), ((1,), (1,)))
    with pytest.raises(CompressionError, match="more layers"):
        solve_shape(llm.model, CompressionConfig(target_fraction=0.9, num_layers=2))


def test_prepared_proxy_is_cached_and_rebuilds_from_its_artefact(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path))
    config = CompressionConfig(target_fraction=0.5, distill=LogitDistillConfig(steps=2, batch_size=2, max_length=12))
    first = prepare_proxy(llm.model, llm.tokenizer, TEXTS, config, progress=False)
    assert not first.from_cache and len(first.history) == 2
    distilled = proxy_layer_state(first.model)
    assert any(
        not torch.equal(distilled[k], v) for k, v in proxy_layer_state(build_proxy(llm.model, first.plan)).items()
    )
    second = prepare_proxy(llm.model, llm.tokenizer, TEXTS, config, progress=False)
    assert second.from_cache and second.plan == first.plan
    assert all(torch.equal(distilled[k], v) for k, v in proxy_layer_state(second.model).items())
    # What a client rebuilds from the handed-out config JSON and weights computes the same function.
    loaded = LoadedModel(first.model, llm.tokenizer, "proxy")
    rebuilt = build_from_parts(describe(loaded), unique_state_dict(first.model))
    ids = torch.tensor([[3, 4, 5]])
    assert torch.allclose(_logits(rebuilt.model, ids), _logits(first.model, ids), atol=1e-5)
