"""Configuration of offsite tuning (Xiao et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

from blindtune.models.adapters import AdapterConfig


@dataclass
class OffsiteConfig:
    """The emulator the server hands out and the adapter clients train on it.

    adapter_layers_per_side: the bottom and top k decoder layers form the adapter.
    middle_keep_every: the emulator keeps 1 of every n middle layers (uniform layer drop).
    adapter: what is trained on the adapter layers (full layers or LoRA).
    """

    adapter_layers_per_side: int = 3
    middle_keep_every: int = 3
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
