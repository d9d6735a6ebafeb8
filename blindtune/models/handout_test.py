"""Training-free hand-outs: the layers they keep, the channels they zero, where adapters go."""

import torch

from blindtune.models.handout import HandoutConfig, build_handout
from blindtune.models.loading import tiny_model
from blindtune.models.surgery import decoder_layers


def test_a_pruned_hand_out_keeps_the_ends_and_zeroes_the_least_important_middle_channels():
    llm = tiny_model(num_layers=6, hidden_size=32)
    config = HandoutConfig(adapter_layers_per_side=1, middle_keep_every=1, middle_mlp_keep=0.25, importance_texts=8)
    handout = build_handout(llm.model, llm.tokenizer, config)
    layers, originals = decoder_layers(handout.model), decoder_layers(llm.model)
    assert len(layers) == 6 and handout.layer_map("all") == {i: i for i in range(6)}
    assert handout.layer_map("ends") == {0: 0, 5: 5}
    for index in (0, 5):  # the adapter layers are exact copies
        for mine, theirs in zip(layers[index].parameters(), originals[index].parameters(), strict=True):
            assert torch.equal(mine, theirs)
    for index in range(1, 5):
        mlp = layers[index].mlp
        kept = (mlp.down_proj.weight != 0).any(dim=0)
        assert int(kept.sum()) == round(0.25 * mlp.down_proj.weight.shape[1])
        assert torch.equal((mlp.up_proj.weight != 0).any(dim=1), kept)  # a zeroed channel is zero everywhere
        assert torch.equal(layers[index].self_attn.q_proj.weight, originals[index].self_attn.q_proj.weight)
    assert 0 < handout.parameter_share < 1


def test_a_layer_dropped_hand_out_maps_adapters_to_their_llm_layers():
    llm = tiny_model(num_layers=8, hidden_size=32)
    handout = build_handout(llm.model, llm.tokenizer, HandoutConfig(adapter_layers_per_side=2, middle_keep_every=2))
    assert handout.plan.emulator_layers == (0, 1, 2, 4, 6, 7)
    assert handout.layer_map("ends") == {0: 0, 1: 1, 4: 6, 5: 7}
    assert handout.layer_map("all") == {0: 0, 1: 1, 2: 2, 3: 4, 4: 6, 5: 7}


def test_a_shared_hand_out_keeps_the_depth_with_the_kept_layers_standing_in_for_the_dropped():
    llm = tiny_model(num_layers=8, hidden_size=32)
    config = HandoutConfig(adapter_layers_per_side=2, middle_keep_every=2, middle_share=True)
    handout = build_handout(llm.model, llm.tokenizer, config)
    layers = decoder_layers(handout.model)
    assert len(layers) == 8 and layers[3] is layers[2] and layers[5] is layers[4]
    assert handout.layer_map("ends") == {0: 0, 1: 1, 6: 6, 7: 7}
