"""Configuration of FedCoT (Fan et al., Findings of EMNLP 2025): privatised prompts, server rationales,
client SLMs trained on labels and rationales."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from blindtune.models.adapters import AdapterConfig, AdapterKind
from blindtune.models.compression import CompressionConfig
from blindtune.privacy.text_privatisation import PrivatisationConfig


class RationaleSource(enum.StrEnum):
    SERVER = "server"  # the server LLM explains each privatised prompt (FedCoT)
    ORACLE = "oracle"  # the client's own gold worked solutions (GSM8K): an upper bound, nothing is sent


def _lora() -> AdapterConfig:
    return AdapterConfig(kind=AdapterKind.LORA, lora_rank=8, lora_alpha=16.0)


@dataclass
class FedCoTConfig:
    """The client SLM, the privatisation of prompts, the rationale service and the multi-task training.

    slm_layers_per_side / slm_keep_every: the client SLM is the LLM compressed by layer drop
        (`blindtune.models.surgery`): the bottom and top k layers and 1 of every n middle layers.
    slm_compression: when set, the SLM is instead the server-guided compressed proxy of
        `blindtune.models.compression` (narrower and shallower, recovered on public text).
    public_text: the server's public text for `slm_compression` (never client data).
    adapter: what clients train on the SLM (LoRA on every SLM layer by default; FedAvg'd over rounds).
    privatisation: the exponential mechanism applied to each prompt before it leaves the client.
    prompts_per_client: how many of its examples each client privatises and gets rationales for.
    rationale_source: `server` (the LLM explains privatised prompts) or `oracle` (the gold worked
        solutions of a generation task such as GSM8K: the oracle-rationale upper bound).
    rationale_template: what the server LLM is asked, with `{prompt}` replaced by the privatised prompt;
        empty: the task's default template (`blindtune.methods.fedcot.rationales`).
    max_new_tokens / generation_batch_size: greedy generation budget and batch of the rationale service.
    rationale_weight: lambda in L = L_label + lambda * L_rationale.
    label_prefix / rationale_prefix: task prefixes put before the prompt of each output (as in
        distilling step-by-step); inference uses the label prompt only, which is what is evaluated.
    filter_rationales: drop rationales whose answer disagrees with the client's gold label (client-side).
    label_only_baseline: also federate the same SLM with lambda = 0 (labels only, same budget) and report
        it as metrics.label_only (a reference pass, not counted in the run's cost).
    """

    slm_layers_per_side: int = 3
    slm_keep_every: int = 3
    slm_compression: CompressionConfig | None = None
    public_text: str = "wordnet:adj,adv"
    adapter: AdapterConfig = field(default_factory=_lora)
    privatisation: PrivatisationConfig = field(default_factory=PrivatisationConfig)
    prompts_per_client: int = 200
    rationale_source: RationaleSource = RationaleSource.SERVER
    rationale_template: str = ""
    max_new_tokens: int = 64
    generation_batch_size: int = 16
    rationale_weight: float = 1.0
    label_prefix: str = ""
    rationale_prefix: str = "[rationale] "
    filter_rationales: bool = False
    label_only_baseline: bool = True

    def __post_init__(self) -> None:
        self.rationale_source = RationaleSource(self.rationale_source)
        if self.prompts_per_client < 1 or self.max_new_tokens < 1 or self.generation_batch_size < 1:
            raise ValueError("prompts_per_client, max_new_tokens and generation_batch_size must be >= 1")
        if not math.isfinite(self.rationale_weight) or self.rationale_weight < 0:
            raise ValueError(f"rationale_weight must be finite and >= 0, got {self.rationale_weight}")
        if self.rationale_template and "{prompt}" not in self.rationale_template:
            raise ValueError("rationale_template must contain {prompt}")
