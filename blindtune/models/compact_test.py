"""A compact hand-out is the zeroed one at its real size: same outputs, same adapter training."""

import copy

import torch

from blindtune.data import Example
from blindtune.models.adapters import AdapterConfig, attach_adapter, untrained_adapter_state
from blindtune.models.artefact import describe, load_artefact, save_artefact, stored_mlp_channels, unique_state_dict
from blindtune.models.compact import compacted
from blindtune.models.handout import HandoutConfig, build_handout
from blindtune.models.loading import LoadedModel, tiny_model
from blindtune.models.surgery import decoder_layers
from blindtune.training import TrainConfig, train


def _pruned_hand_out() -> tuple[LoadedModel, torch.nn.Module]:
    llm = tiny_model(num_layers=6, hidden_size=32)
    config = HandoutConfig(adapter_layers_per_side=1, middle_keep_every=1, middle_mlp_keep=0.25, importance_texts=8)
    return llm, build_handout(llm.model, llm.tokenizer, config).model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 42, 9, 300]])).logits


def test_compacting_drops_the_zeroed_channels_and_keeps_the_function():
    llm, zeroed = _pruned_hand_out()
    compact, channels = compacted(zeroed)
    assert compact is not zeroed and sorted(channels.kept) == [1, 2, 3, 4] and channels.width == 64
    for position, layer in enumerate(decoder_layers(compact)):
        expected = 16 if position in channels.kept else 64
        assert layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features == expected
    assert decoder_layers(zeroed)[2].mlp.up_proj.out_features == 64  # the server's copy is untouched
    torch.testing.assert_close(_logits(compact), _logits(zeroed), atol=1e-5, rtol=1e-4)
    same, none = compacted(llm.model)
    assert same is llm.model and none.kept == {}


def test_lora_trained_on_the_compact_hand_out_equals_lora_trained_on_the_zeroed_one():
    llm, zeroed = _pruned_hand_out()
    layer_map = {i: i for i in range(6)}
    adapter = AdapterConfig(lora_rank=4)
    initial = untrained_adapter_state(copy.deepcopy(zeroed), layer_map, adapter, seed=0)
    examples = [Example(prompt=f"Word {i}:", target=f" answer {i % 3}") for i in range(16)]
    config = TrainConfig(steps=4, batch_size=4, learning_rate=1e-2)

    on_zeroed = attach_adapter(copy.deepcopy(zeroed), layer_map, adapter, seed=0)
    on_zeroed.load_state(initial)
    train(on_zeroed.model, llm.tokenizer, examples, config, seed=0, progress=False)

    compact, channels = compacted(zeroed)
    on_compact = attach_adapter(compact, layer_map, adapter, seed=1)  # its own draw: overwritten by the state
    on_compact.load_state(channels.compact_state(initial, layer_map))
    assert on_compact.state()["layers.2.mlp.down_proj.lora_A.weight"].shape == (4, 16)
    train(on_compact.model, llm.tokenizer, examples, config, seed=0, progress=False)

    expected = on_zeroed.state()
    restored = channels.full_state(on_compact.state(), initial, layer_map)
    assert set(restored) == set(expected)
    # Equal up to rounding: the two models sum their MLP outputs over 16 and 64 channels, and AdamW's
    # first steps (update ~ lr x g / |g|) magnify rounding differences in small gradients to ~1e-5.
    # A channel mapped wrong moves an entry by the size of its update (~1e-2).
    for name, tensor in expected.items():
        torch.testing.assert_close(restored[name], tensor, atol=1e-4, rtol=1e-3, msg=name)
    # The dropped channels' entries are what the server sent: B rows zero, A columns their start.
    dropped = [c for c in range(64) if c not in channels.kept[2]]
    assert not expected["layers.2.mlp.up_proj.lora_B.weight"][dropped].any()
    assert torch.equal(
        restored["layers.2.mlp.down_proj.lora_A.weight"][:, dropped],
        initial["layers.2.mlp.down_proj.lora_A.weight"][:, dropped],
    )


def test_a_stored_compact_artefact_rebuilds_at_its_compact_size(tmp_path):
    llm, zeroed = _pruned_hand_out()
    compact, channels = compacted(zeroed)
    shipped = LoadedModel(compact, llm.tokenizer, "emulator")
    save_artefact(tmp_path, describe(shipped, channels), unique_state_dict(compact))
    rebuilt = load_artefact(tmp_path)
    assert stored_mlp_channels(tmp_path) == channels
    assert decoder_layers(rebuilt.model)[3].mlp.gate_proj.out_features == 16
    torch.testing.assert_close(_logits(rebuilt.model), _logits(zeroed), atol=1e-5, rtol=1e-4)
