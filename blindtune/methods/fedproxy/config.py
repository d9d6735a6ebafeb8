"""Configuration of FedProxy (Fan et al.): clients fine-tune a proxy compressed from the LLM."""

from __future__ import annotations

from dataclasses import dataclass, field

from blindtune.models.adapters import AdapterConfig, AdapterKind
from blindtune.models.compression import CompressionConfig


@dataclass
class FedProxyConfig:
    """The proxy the server derives and hands out, and what clients train on it.

    compression: layers kept, heads/channels pruned by importance on public text, target size and the
        logit-distillation recovery (see `blindtune.models.compression`).
    adapter: what clients train on every proxy layer: `lora` (LoRA on the listed linear modules) or
        `layers` (full fine-tuning of the proxy's decoder layers). A soft prompt is refused: it changes
        no proxy weight, so nothing would plug into the LLM.
    public_text: the server's own text for importance, distillation and the perplexity ratio
        (see `blindtune.models.distill.public_texts`); never client data.
    cache_proxy: reuse a compressed and distilled proxy from the user cache when the settings match.
    ppl_max_length: tokens per held-out public text for the proxy/LLM perplexity ratio.
    """

    compression: CompressionConfig = field(default_factory=CompressionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    public_text: str = "wordnet:adj,adv"
    cache_proxy: bool = True
    ppl_max_length: int = 64

    def __post_init__(self) -> None:
        if self.adapter.kind is AdapterKind.SOFT_PROMPT:
            raise ValueError("fedproxy clients fine-tune proxy weights: adapter.kind must be lora or layers")
        if self.ppl_max_length < 2:
            raise ValueError(f"ppl_max_length must be >= 2, got {self.ppl_max_length}")
