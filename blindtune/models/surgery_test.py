import pytest
import torch

from blindtune.models import tiny_model
from blindtune.models.surgery import adapter_layer_map, build_emulator, canonical_name, num_decoder_layers, plan_layers


def test_plan_keeps_adapter_layers_and_subsamples_the_middle():
    plan = plan_layers(30, adapter_layers_per_side=2, middle_keep_every=3)
    assert plan.bottom == (0, 1) and plan.top == (28, 29)
    assert plan.middle == tuple(range(2, 28, 3))
    assert len(plan.emulator_layers) == 4 + 9
    assert plan.emulator_position_of[28] == 11


@pytest.mark.parametrize(("k", "every"), [(0, 1), (3, 1), (1, 0)])
def test_plan_rejects_impossible_splits(k, every):
    with pytest.raises(ValueError):
        plan_layers(6, k, every)


def test_emulator_has_the_planned_layers_and_runs():
    llm = tiny_model(num_layers=8).model
    plan = plan_layers(8, 1, 2)
    emulator = build_emulator(llm, plan)
    assert num_decoder_layers(emulator) == len(plan.emulator_layers) == emulator.config.num_hidden_layers
    assert num_decoder_layers(llm) == 8  # the LLM is untouched
    for position, source in enumerate(plan.emulator_layers):
        got = emulator.model.layers[position].mlp.up_proj.weight
        assert torch.equal(got, llm.model.layers[source].mlp.up_proj.weight)
        assert got.data_ptr() != llm.model.layers[source].mlp.up_proj.weight.data_ptr()
        assert emulator.model.layers[position].self_attn.layer_idx == position
    ids = torch.tensor([[1, 2, 3, 4]])
    assert emulator(input_ids=ids).logits.shape == (1, 4, llm.config.vocab_size)
    # tied embeddings stay tied in the copy
    assert emulator.lm_head.weight.data_ptr() == emulator.model.embed_tokens.weight.data_ptr()


def test_emulator_equal_to_llm_when_nothing_is_dropped():
    llm = tiny_model(num_layers=4).model
    emulator = build_emulator(llm, plan_layers(4, 1, 1))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(emulator(input_ids=ids).logits, llm(input_ids=ids).logits)


def test_canonical_names_map_positions_to_llm_layers():
    assert (
        canonical_name("base_model.model.model.layers.3.mlp.up_proj.weight", {3: 29}) == "layers.29.mlp.up_proj.weight"
    )
    assert canonical_name("model.layers.2.mlp.up_proj.weight", {3: 29}) is None
    assert canonical_name("model.embed_tokens.weight", {3: 29}) is None


def test_adapter_layer_map_can_leave_the_top_layers_frozen():
    plan = plan_layers(30, adapter_layers_per_side=2, middle_keep_every=3)
    assert adapter_layer_map(plan) == {0: 0, 1: 1, 11: 28, 12: 29}
    assert adapter_layer_map(plan, train_top=False) == {0: 0, 1: 1}
