"""Offsite tuning's own options, on a tiny model through the in-process Flower grid."""

import re

import pytest

from blindtune.audits.audit import final_adapter
from blindtune.config import ConfigError
from blindtune.conftest import tiny_run_config
from blindtune.runner import run_experiment

ONE_LAYER_PER_SIDE = {"adapter_layers_per_side": 1, "middle_keep_every": 2, "privacy": None}


def trained_layers(state) -> set[int]:
    return {int(re.search(r"layers\.(\d+)\.", name).group(1)) for name in state}


@pytest.mark.parametrize(("where", "expected"), [("ends", {0, 7}), ("all", {0, 1, 3, 5, 7})])
def test_clients_train_the_adapter_where_the_config_says(where, expected, tiny_model_dir, tmp_path):
    """8 layers, 1 intact per side, every 2nd middle one kept: `ends` trains layers 0 and 7, `all` every
    layer the emulator has, named by its LLM layer so that it plugs in there."""
    overrides = {
        "offsite": {**ONE_LAYER_PER_SIDE, "adapter_layers": where},
        "baselines": {"centralized": False, "local_only": False},
    }
    results = run_experiment(tiny_run_config("offsite", tiny_model_dir, overrides), tmp_path, progress=False)
    assert results["details"]["emulator"]["emulator_layers"] == [0, 1, 3, 5, 7]
    assert trained_layers(final_adapter(tmp_path)) == expected


def test_adapter_layers_is_ends_or_all(tiny_model_dir):
    with pytest.raises(ConfigError, match="adapter_layers"):
        tiny_run_config("offsite", tiny_model_dir, {"offsite": {"adapter_layers": "middle"}})
    with pytest.raises(ConfigError, match="train_top_layers"):
        tiny_run_config("offsite", tiny_model_dir, {"offsite": {"adapter_layers": "all", "train_top_layers": False}})
    whole_layers = {"adapter_layers": "all", "adapter": {"kind": "layers"}}
    with pytest.raises(ConfigError, match="LoRA"):  # the pruned middle layers would replace the LLM's
        tiny_run_config("offsite", tiny_model_dir, {"offsite": whole_layers})


def test_the_defaults_are_the_recipe_and_adapter_layers_follows_the_adapter(tiny_model_dir):
    """Unset, a user's offsite section gets the demo's hand-out (full depth, 10% of the middle MLP
    channels) with LoRA on every layer; whole-layer adapters or bottom-only training fall back to the
    ends instead of failing on a setting the user never wrote."""
    recipe = tiny_run_config("offsite", tiny_model_dir).method_config
    assert (recipe.middle_keep_every, recipe.middle_mlp_keep, recipe.adapter_layers) == (1, 0.1, "all")
    for unset in ({"adapter": {"kind": "layers"}}, {"train_top_layers": False}):
        assert tiny_run_config("offsite", tiny_model_dir, {"offsite": unset}).method_config.adapter_layers == "ends"
