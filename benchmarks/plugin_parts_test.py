"""Plug-in variants of a finished offsite run on a tiny model: the parts on zeroed channels are found."""

from __future__ import annotations

import torch

from benchmarks.plugin_parts import measure, without_zeroed_channel_parts
from blindtune.audits.audit import final_adapter
from blindtune.methods.offsite.server import handed_out_emulator
from blindtune.models import load_model
from blindtune.models.surgery import decoder_layers


def test_the_parts_on_zeroed_channels_are_removed_and_every_variant_is_scored(finished_offsite_run):
    offsite = {"adapter_layers_per_side": 1, "middle_keep_every": 1, "middle_mlp_keep": 0.5, "privacy": None}
    config, run_dir, _ = finished_offsite_run(offsite)
    state = final_adapter(run_dir)
    _, handout = handed_out_emulator(load_model(config.model), config, progress=False)
    masked = without_zeroed_channel_parts(state, handout.model)
    for index in (1, 2):
        zeroed = (decoder_layers(handout.model)[index].mlp.down_proj.weight == 0).all(dim=0)
        assert 0 < int(zeroed.sum()) < zeroed.numel()
        a = masked[f"layers.{index}.mlp.down_proj.lora_A.weight"]
        assert (a[:, zeroed] == 0).all() and torch.equal(
            a[:, ~zeroed], state[f"layers.{index}.mlp.down_proj.lora_A.weight"][:, ~zeroed]
        )
        assert (masked[f"layers.{index}.mlp.up_proj.lora_B.weight"][zeroed] == 0).all()
    for name in state:
        if name.startswith(("layers.0.", "layers.3.")) or ".self_attn." in name:
            assert torch.equal(masked[name], state[name])  # the intact layers and attention are untouched

    row = measure(run_dir, progress=False)
    assert len(row["plugin"]) == 9 and all(0 <= accuracy <= 1 for accuracy in row["plugin"].values())
