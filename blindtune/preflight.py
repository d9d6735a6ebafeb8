"""Checks of a run config against the model it names, made before any work starts (no Ray, no output)."""

from __future__ import annotations

from transformers import AutoConfig

from blindtune.config import ConfigError, RunConfig
from blindtune.models.loading import resolve_model_dir

# Method settings that take layers from the bottom and the top of the LLM, leaving a middle block.
_LAYERS_PER_SIDE = ("adapter_layers_per_side", "slm_adapter_layers_per_side")


def check_model_fits(config: RunConfig) -> None:
    """The model exists, and the method's layer counts fit it (ConfigError naming the key otherwise)."""
    directory = resolve_model_dir(config.model)
    num_layers = getattr(AutoConfig.from_pretrained(directory), "num_hidden_layers", None)
    if num_layers is None:
        return
    for name in _LAYERS_PER_SIDE:
        per_side = getattr(config.method_config, name, None)
        if per_side is not None and 2 * per_side >= num_layers:
            raise ConfigError(
                f"{config.method}.{name}: {per_side} layers per side leave no middle block in the "
                f"{num_layers}-layer model {config.model} (at most {(num_layers - 1) // 2})"
            )
