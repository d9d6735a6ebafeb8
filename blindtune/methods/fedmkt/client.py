"""FedMKT, client side: the client's small model (SLM) learns from its private data and from the LLM's
distributions on the public set, and shares its own distributions on that public set (with
`slm_fedavg`, also its SLM weights, unprotected).

Messages (all through the method's `client`):
- setup, first: the public set arrives (as text); a client that builds its own SLM (WordPiece) builds
  it now and replies with its tokenizer; a client that uses the server's compressed SLM asks for it.
- setup, second (compressed SLMs only): the SLM arrives as an artefact; the client stores it.
  Either way the reply carries the SLM's accuracy before any training (`slm_before`).
- train, phase `local`: train on private examples, reply with top-K distributions on the public set.
- train, phase `distil`: learn from the LLM's distributions (aligned to this SLM's tokenisation) where
  the LLM's loss on a public sequence is lower than the SLM's own, reply with metrics (and accuracy).
State between messages (SLM weights or LoRA, public set) lives in the client's work directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.federation.records import MessageKind, RecordKey, arrays, number, tensors_to_record
from blindtune.methods.base import ClientRun
from blindtune.methods.fedmkt.config import FedMKTConfig, SLMKind
from blindtune.methods.fedmkt.knowledge import (
    Knowledge,
    continuation_lengths,
    distil,
    encode_public,
    extract_knowledge,
    kd_targets,
    public_from_record,
    public_to_record,
    teacher_weights,
    tokenizer_to_record,
)
from blindtune.methods.fedmkt.token_alignment import load_wordpiece_tokenizer
from blindtune.models.adapters import AdaptedModel, attach_adapter
from blindtune.models.artefact import (
    ArtefactSpec,
    describe,
    has_artefact,
    load_artefact,
    save_artefact,
    unique_state_dict,
)
from blindtune.models.device import place
from blindtune.models.loading import LoadedModel, random_model
from blindtune.models.surgery import num_decoder_layers
from blindtune.training import train

PHASE = "phase"
LOCAL = "local"
DISTIL = "distil"
ROUND = "round"
SEED = "seed"
EVALUATE = "evaluate"
NEEDS_SLM = "needs_slm"
PARTITION = "partition_id"

Metrics = dict[str, int | float | list[int] | list[float]]  # what a MetricRecord holds

_PUBLIC_FILE = "public_set.json"
_SLM_DIR = "slm"
_LORA_FILE = "slm_lora.safetensors"


@dataclass
class LocalSLM:
    """The client's SLM; `adapted` holds its LoRA (compressed SLM) or is None (every weight trains)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapted: AdaptedModel | None

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.adapted is not None:
            return self.adapted.state()
        return {name: tensor.detach().clone() for name, tensor in unique_state_dict(self.model).items()}  # type: ignore[arg-type]

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.adapted is not None:
            self.adapted.load_state(state)
        else:
            self.model.load_state_dict(state, strict=False)


def wordpiece_slm(method: FedMKTConfig, seed: int) -> LoadedModel:
    """A randomly initialised Llama on the WordPiece tokenizer: it knows nothing until trained."""
    tokenizer = load_wordpiece_tokenizer()
    slm = random_model(tokenizer, method.wordpiece_layers, method.wordpiece_hidden_size, seed, "wordpiece-slm")
    place(slm.model)  # it computes where this party computes
    return slm


def load_slm(workdir: Path, method: FedMKTConfig, kind: SLMKind, seed: int) -> LocalSLM:
    loaded = load_artefact(workdir / _SLM_DIR)
    if kind is SLMKind.WORDPIECE:
        for parameter in loaded.model.parameters():
            parameter.requires_grad_(True)
        return LocalSLM(loaded.model, loaded.tokenizer, None)
    layers = {i: i for i in range(num_decoder_layers(loaded.model))}
    adapted = attach_adapter(loaded.model, layers, method.slm_adapter, seed=seed)
    if (workdir / _LORA_FILE).is_file():
        adapted.load_state(load_file(workdir / _LORA_FILE))
    return LocalSLM(adapted.model, loaded.tokenizer, adapted)


def save_slm(slm: LocalSLM, workdir: Path) -> None:
    if slm.adapted is not None:
        save_file({k: v.contiguous() for k, v in slm.adapted.state().items()}, workdir / _LORA_FILE)
        return
    loaded = LoadedModel(slm.model, slm.tokenizer, "wordpiece-slm")  # type: ignore[arg-type]
    save_artefact(workdir / _SLM_DIR, describe(loaded), unique_state_dict(loaded.model))


def evaluate_slm(run: ClientRun, slm: LocalSLM, desc: str) -> float:
    task = run.config.load_task()
    return run.config.eval.evaluator(task, progress=False)(slm.model, slm.tokenizer, desc)


def answer(kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
    method: FedMKTConfig = run.config.method_config
    slm_kind = method.slm_kind(run.partition_id)
    if kind is MessageKind.SETUP:
        if RecordKey.PUBLIC_SET in content.config_records:
            return _receive_public_set(content, run, method, slm_kind)
        return _receive_slm(content, run, method, slm_kind)
    phase = str(content[RecordKey.INSTRUCTIONS][PHASE])
    if phase == LOCAL:
        return _local_round(content, run, method, slm_kind)
    if phase == DISTIL:
        return _distil_round(content, run, method, slm_kind)
    raise ValueError(f"unknown FedMKT phase {phase!r}")


def _public(run: ClientRun) -> list[Example]:
    data = json.loads((run.workdir / _PUBLIC_FILE).read_text())
    return public_from_record(ConfigRecord(data))


def _receive_public_set(content: RecordDict, run: ClientRun, method: FedMKTConfig, kind: SLMKind) -> RecordDict:
    public = public_from_record(content.config_records[RecordKey.PUBLIC_SET])
    (run.workdir / _PUBLIC_FILE).write_text(json.dumps(dict(public_to_record(public))))
    metrics: Metrics = {PARTITION: run.partition_id, NEEDS_SLM: int(kind is SLMKind.COMPRESSED)}
    if kind is SLMKind.COMPRESSED:
        return RecordDict({RecordKey.METRICS: MetricRecord(metrics)})
    built = wordpiece_slm(method, run.config.seed)
    save_artefact(run.workdir / _SLM_DIR, describe(built), unique_state_dict(built.model))
    slm = load_slm(run.workdir, method, kind, run.config.seed)
    metrics["slm_before"] = evaluate_slm(run, slm, "SLM before")
    return RecordDict(
        {RecordKey.METRICS: MetricRecord(metrics), RecordKey.TOKENIZER: tokenizer_to_record(slm.tokenizer)}
    )


def _receive_slm(content: RecordDict, run: ClientRun, method: FedMKTConfig, kind: SLMKind) -> RecordDict:
    if kind is not SLMKind.COMPRESSED:
        raise ValueError(f"client {run.partition_id} builds its own {kind} SLM: it does not take one")
    spec = ArtefactSpec.from_json(str(content[RecordKey.ARTEFACT_SPEC]["json"]))
    save_artefact(run.workdir / _SLM_DIR, spec, arrays(content, RecordKey.ARTEFACT))
    slm = load_slm(run.workdir, method, kind, run.config.seed)
    metrics: Metrics = {PARTITION: run.partition_id, "slm_before": evaluate_slm(run, slm, "SLM before")}
    # The server knows the tokenizer it handed out: no need to send it back.
    return RecordDict(
        {RecordKey.METRICS: MetricRecord(metrics), RecordKey.TOKENIZER: ConfigRecord({"same_as_artefact": True})}
    )


def _local_round(content: RecordDict, run: ClientRun, method: FedMKTConfig, kind: SLMKind) -> RecordDict:
    if not has_artefact(run.workdir / _SLM_DIR):
        raise FileNotFoundError(f"client {run.partition_id} has no SLM: the setup messages were not received")
    seed = int(number(content, RecordKey.INSTRUCTIONS, SEED))
    round_number = int(number(content, RecordKey.INSTRUCTIONS, ROUND))
    slm = load_slm(run.workdir, method, kind, seed)
    train_config = run.config.train
    if kind is SLMKind.WORDPIECE:
        train_config = dataclasses.replace(train_config, learning_rate=method.wordpiece_learning_rate)
    stats = train(
        slm.model,
        slm.tokenizer,
        run.examples,
        train_config,
        seed=seed * 1_000_003 + round_number * 1009 + run.partition_id,
        progress=False,
        desc=f"client {run.partition_id} round {round_number}",
    )
    save_slm(slm, run.workdir)
    public = _public(run)
    encoded = encode_public(slm.tokenizer, public, method.max_length)
    knowledge = extract_knowledge(slm.model, encoded, public, slm.pad_id, method.top_k)
    reply = RecordDict(
        {
            RecordKey.KNOWLEDGE: knowledge.to_record(),
            RecordKey.METRICS: MetricRecord(
                {
                    PARTITION: run.partition_id,
                    "num_examples": len(run.examples),
                    "examples_seen": stats.examples_seen,
                    "train_loss": stats.mean_loss,
                    "train_seconds": stats.seconds,
                    "train_tokens": stats.tokens_seen,
                    "public_loss": float(knowledge.losses.mean()),
                }
            ),
        }
    )
    if method.slm_fedavg:
        reply[RecordKey.ADAPTER] = tensors_to_record(slm.trainable_state())
    return reply


def _distil_round(content: RecordDict, run: ClientRun, method: FedMKTConfig, kind: SLMKind) -> RecordDict:
    seed = int(number(content, RecordKey.INSTRUCTIONS, SEED))
    round_number = int(number(content, RecordKey.INSTRUCTIONS, ROUND))
    slm = load_slm(run.workdir, method, kind, seed)
    if RecordKey.ADAPTER in content.array_records:  # the average over clients with this architecture
        slm.load_trainable_state(arrays(content, RecordKey.ADAPTER))
    public = _public(run)
    encoded = encode_public(slm.tokenizer, public, method.max_length)
    vocab_size = slm.model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    teacher = Knowledge.from_record(
        content.array_records[RecordKey.KNOWLEDGE], continuation_lengths(encoded), vocab_size
    )
    own = extract_knowledge(slm.model, encoded, public, slm.pad_id, 1)
    weights = teacher_weights(own.losses, teacher.losses[None, :])
    learning_rate = method.wordpiece_learning_rate if kind is SLMKind.WORDPIECE else method.client_learning_rate
    stats = distil(
        slm.model,
        encoded,
        kd_targets([teacher], weights),
        slm.pad_id,
        steps=method.client_distill_steps,
        batch_size=run.config.train.batch_size,
        learning_rate=learning_rate,
        kd_alpha=method.kd_alpha,
        seed=seed * 1_000_003 + round_number * 1009 + run.partition_id,
    )
    save_slm(slm, run.workdir)
    metrics: Metrics = {
        PARTITION: run.partition_id,
        "distil_loss": stats.mean_loss,
        "distil_seconds": stats.seconds,
        "public_examples_seen": method.client_distill_steps * run.config.train.batch_size,
        "teacher_sequences": float(weights.sum()),
        "public_sequences": len(public),
    }
    if bool(content[RecordKey.INSTRUCTIONS][EVALUATE]):
        metrics["slm_accuracy"] = evaluate_slm(run, slm, f"SLM round {round_number}")
    return RecordDict({RecordKey.METRICS: MetricRecord(metrics)})
