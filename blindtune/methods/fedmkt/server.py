"""FedMKT, server side: the LLM and the clients' small models teach each other through their top-K
distributions on a public set; each side trains only its own weights (the LLM: LoRA).

    blindtune run blindtune/configs/fedmkt_wordnet_3clients.yaml --out runs/fedmkt

1. Setup: send the public set (text) to every client; hand the compressed SLM (the LLM with layers
   dropped) to clients that use it; learn each client's tokenizer and build the MinED vocabulary
   maps between it and the LLM's (both directions, cached).
2. Each round: (a, b) clients train on private data and send their top-K distributions on the public
   set; (c) the server aligns them to the LLM's tokenisation and vocabulary, picks per sequence the
   clients whose loss beats the LLM's (`teacher_weights`), and distils into the LLM's LoRA with
   (1 - kd_alpha) * LM + kd_alpha * KD; (d) it sends its own distributions, aligned to each client's
   tokenisation, and the clients distil where the LLM beats them. With `slm_fedavg` the clients also
   send their SLM weights (LoRA, or a WordPiece SLM's every weight), trained on their private data and
   unprotected, and the server averages those of clients with the same architecture (FedAvg).
3. Baseline: the LLM trained by the same server schedule on the public set alone (`llm_public_only`);
   the federation's contribution is `plugin - llm_public_only` (`federation_gain`).
Without `slm_fedavg`, no client weights and no client data cross: only distributions on the public set.
The LLM's weights never leave the server (beyond the SLM it chooses to hand out).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.federation.adapter_rounds import same_for_all
from blindtune.federation.aggregation import ClientUpdate
from blindtune.federation.checkpoint import CONFIG_HASH, save_checkpoint
from blindtune.federation.ledger import Direction
from blindtune.federation.records import MessageKind, RecordKey, arrays, number, tensors_to_record
from blindtune.federation.rounds import TooFewClientsError
from blindtune.methods.base import ServerResult, ServerRun
from blindtune.methods.fedmkt.client import DISTIL, EVALUATE, LOCAL, NEEDS_SLM, PARTITION, PHASE, ROUND, SEED
from blindtune.methods.fedmkt.config import VALIDATION_INPUTS, VALIDATION_LABELLED, FedMKTConfig
from blindtune.methods.fedmkt.knowledge import (
    DistilStats,
    Encoded,
    Knowledge,
    Target,
    carry_knowledge,
    continuation_lengths,
    distil,
    encode_public,
    extract_knowledge,
    kd_targets,
    public_to_record,
    teacher_weights,
    tokenizer_from_record,
)
from blindtune.methods.fedmkt.token_alignment import VocabMap, build_vocab_map, vocab_fingerprint
from blindtune.models import load_model
from blindtune.models.adapters import AdaptedModel, attach_adapter
from blindtune.models.artefact import describe, unique_state_dict
from blindtune.models.compression import prepare_proxy
from blindtune.models.distill import public_texts
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import build_emulator, num_decoder_layers, plan_layers

if TYPE_CHECKING:
    from blindtune.config import RunConfig

log = logging.getLogger(__name__)


def public_examples(config: RunConfig) -> list[Example]:
    """The server's public set: (prompt, continuation) pairs. Only `validation-labelled` (an explicit
    opt-in) puts task answers in it; every other source is plain text split after its first word."""
    method: FedMKTConfig = config.method_config
    if method.public_set == VALIDATION_LABELLED:
        examples = config.load_task().validation
    else:
        if method.public_set == VALIDATION_INPUTS:
            texts = [example.prompt for example in config.load_task().validation]
        else:
            texts = public_texts(method.public_set, config.task, config.seed).train
        examples = []
        for text in texts:
            first, _, rest = text.strip().partition(" ")
            if first and rest.strip():
                examples.append(Example(prompt=first, target=" " + rest.strip()))
    if not examples:
        raise ValueError(f"public set {method.public_set!r} is empty")
    return examples[: method.public_limit]


def compressed_slm(llm: LoadedModel, config: RunConfig, progress: bool = False) -> LoadedModel:
    """The SLM handed to `compressed` clients: the LLM with its middle layers sub-sampled, or (with
    `compression` set) its pruned and distilled proxy."""
    method: FedMKTConfig = config.method_config
    if method.compression is not None:
        texts = public_texts(method.compression_text, config.task, config.seed).train
        proxy = prepare_proxy(llm.model, llm.tokenizer, texts, method.compression, seed=config.seed, progress=progress)
        return LoadedModel(proxy.model, llm.tokenizer, "compressed-slm")
    plan = plan_layers(num_decoder_layers(llm.model), method.slm_adapter_layers_per_side, method.slm_middle_keep_every)
    return LoadedModel(build_emulator(llm.model, plan), llm.tokenizer, "compressed-slm")


@dataclass
class ClientView:
    """What the server knows of one client: its partition, tokenizer and the alignment maps."""

    node_id: int
    partition_id: int
    tokenizer: PreTrainedTokenizerBase
    encoded: Encoded  # the public set in the client's tokenisation
    to_llm: VocabMap
    from_llm: VocabMap
    slm_before: float
    architecture: str  # clients with the same architecture can average their SLM weights


def set_up_clients(run: ServerRun, llm: LoadedModel, public: list[Example]) -> dict[int, ClientView]:
    config = run.config
    method: FedMKTConfig = config.method_config
    exchange, min_replies = run.exchange, config.federation.required_replies
    offer = RecordDict({RecordKey.PUBLIC_SET: public_to_record(public)})
    replies = exchange.send(MessageKind.SETUP, same_for_all(offer), exchange.node_ids(), 0, min_replies)
    wanting = [node for node, reply in replies.items() if number(reply, RecordKey.METRICS, NEEDS_SLM)]
    if wanting:
        slm = compressed_slm(llm, config, run.progress)
        handout = RecordDict(
            {
                RecordKey.ARTEFACT: tensors_to_record(unique_state_dict(slm.model)),
                RecordKey.ARTEFACT_SPEC: ConfigRecord({"json": describe(slm).to_json()}),
            }
        )
        replies.update(exchange.send(MessageKind.SETUP, same_for_all(handout), wanting, 0, min_replies=0))
    views: dict[int, ClientView] = {}
    maps: dict[tuple[str, str], VocabMap] = {}
    for node, reply in replies.items():
        if RecordKey.TOKENIZER not in reply.config_records:
            continue  # asked for the SLM but did not store it (the exchange recorded the failure)
        record = reply.config_records[RecordKey.TOKENIZER]
        tokenizer = llm.tokenizer if record.get("same_as_artefact") else tokenizer_from_record(record)
        key = vocab_fingerprint(tokenizer)
        for direction, (source, target) in (("to", (tokenizer, llm.tokenizer)), ("from", (llm.tokenizer, tokenizer))):
            if (direction, key) not in maps:
                maps[(direction, key)] = build_vocab_map(source, target, cache=method.cache_alignment)
        views[node] = ClientView(
            node_id=node,
            partition_id=int(number(reply, RecordKey.METRICS, PARTITION)),
            tokenizer=tokenizer,
            encoded=encode_public(tokenizer, public, method.max_length),
            to_llm=maps[("to", key)],
            from_llm=maps[("from", key)],
            slm_before=number(reply, RecordKey.METRICS, "slm_before"),
            architecture=f"{'artefact' if node in wanting else 'own'}-{key}",
        )
    if len(views) < min_replies:
        raise TooFewClientsError(f"setup: {len(views)} clients ready, {min_replies} required")
    return views


def _average(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of SLM states (FedAvg)."""
    total = sum(update.num_examples for update in updates)
    return {
        name: sum(u.state[name].double() * (u.num_examples / total) for u in updates).to(  # type: ignore[union-attr]
            updates[0].state[name].dtype
        )
        for name in updates[0].state
    }


def run_server(run: ServerRun) -> ServerResult:
    config = run.config
    method: FedMKTConfig = config.method_config
    if run.resume:
        raise ValueError("fedmkt cannot resume an interrupted run: start it again without --resume")
    federation = config.federation
    llm = load_model(config.model)
    evaluate = config.eval.evaluator(config.load_task(), run.progress)
    public = public_examples(config)
    llm_encoded = encode_public(llm.tokenizer, public, method.max_length)
    pad_id = int(llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else llm.tokenizer.eos_token_id)
    metrics: dict[str, float] = {"llm_zero_shot": evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True)}

    views = set_up_clients(run, llm, public)
    metrics["emulator_zero_shot"] = float(np.mean([view.slm_before for view in views.values()]))
    adapted = llm_with_adapter(llm.model, config)
    history: list[dict[str, Any]] = []
    clients: list[dict[str, Any]] = []
    slm_accuracy: dict[int, float] = {}
    for round_number in range(1, federation.rounds + 1):
        evaluate_now = config.eval.every_round or round_number == federation.rounds
        instructions = {ROUND: round_number, SEED: config.seed}
        local = RecordDict({RecordKey.INSTRUCTIONS: ConfigRecord({**instructions, PHASE: LOCAL})})
        replies = run.exchange.send(
            MessageKind.TRAIN, same_for_all(local), sorted(views), round_number, federation.required_replies
        )
        teachers: dict[int, Knowledge] = {}
        for node, reply in replies.items():
            view = views[node]
            try:
                teachers[node] = Knowledge.from_record(
                    reply.array_records[RecordKey.KNOWLEDGE],
                    continuation_lengths(view.encoded),
                    len(view.to_llm.target_of),
                )
            except (KeyError, ValueError, FloatingPointError) as error:
                run.exchange.fail(round_number, node, f"unusable knowledge: {error}")
            clients.append({"round": round_number, "node_id": node, "phase": LOCAL, **dict(reply[RecordKey.METRICS])})
        if len(teachers) < federation.required_replies:
            raise TooFewClientsError(
                f"round {round_number}: {len(teachers)} usable replies, {federation.required_replies} required"
            )

        # (c) the LLM learns from the clients that beat it on each public sequence.
        own = extract_knowledge(adapted.model, llm_encoded, public, pad_id, 1)
        carried = []
        aligned_share = {}
        for node, knowledge in teachers.items():
            view = views[node]
            moved, aligned_share[node] = carry_knowledge(
                knowledge, view.tokenizer, view.encoded, llm.tokenizer, llm_encoded, view.to_llm, method.temperature
            )
            carried.append(moved)
        weights = teacher_weights(
            own.losses, np.stack([k.losses for k in carried]), method.selection, method.selection_temperature
        )
        server_stats = server_distil(
            adapted.model, llm_encoded, kd_targets(carried, weights), pad_id, config, round_number
        )

        # (d) the clients learn from the LLM, in their own tokenisation and vocabulary.
        taught = extract_knowledge(adapted.model, llm_encoded, public, pad_id, method.top_k)
        averages = average_slms(replies, views, teachers) if method.slm_fedavg else {}
        lessons: dict[int, RecordDict] = {}
        for node in teachers:
            view = views[node]
            lesson, _ = carry_knowledge(
                taught, llm.tokenizer, llm_encoded, view.tokenizer, view.encoded, view.from_llm, method.temperature
            )
            content = RecordDict(
                {
                    RecordKey.KNOWLEDGE: lesson.to_record(),
                    RecordKey.INSTRUCTIONS: ConfigRecord({**instructions, PHASE: DISTIL, EVALUATE: evaluate_now}),
                }
            )
            if view.architecture in averages:
                content[RecordKey.ADAPTER] = tensors_to_record(averages[view.architecture])
            lessons[node] = content
        answers = run.exchange.send(
            MessageKind.TRAIN, lessons.__getitem__, sorted(lessons), round_number, federation.required_replies
        )
        for node, reply in answers.items():
            reported = dict(reply[RecordKey.METRICS])
            clients.append({"round": round_number, "node_id": node, "phase": DISTIL, **reported})
            if "slm_accuracy" in reported:
                slm_accuracy[views[node].partition_id] = number(reply, RecordKey.METRICS, "slm_accuracy")

        bytes_this_round = run.exchange.ledger.bytes_by_round[round_number]
        row: dict[str, Any] = {
            "round": round_number,
            "train_loss": float(np.mean([number(replies[n], RecordKey.METRICS, "train_loss") for n in teachers])),
            "server_distil_loss": server_stats.mean_loss,
            "llm_public_loss": float(own.losses.mean()),
            "sequences_taught_by_clients": float((weights.sum(axis=0) > 0).mean()),
            "server_public_examples_seen": method.server_steps * method.server_batch_size,
            "aligned_positions": float(np.mean(list(aligned_share.values()))),
            "bytes_to_clients": bytes_this_round[Direction.TO_CLIENTS],
            "bytes_to_server": bytes_this_round[Direction.TO_SERVER],
        }
        if evaluate_now:
            scorer = evaluate.in_round(round_number, federation.rounds)
            row["plugin"] = scorer(adapted.model, llm.tokenizer, f"LLM after KD round {round_number}")
            row["slm_accuracy"] = float(np.mean(list(slm_accuracy.values()))) if slm_accuracy else None
        log.info("round %d: %s", round_number, row)
        history.append(row)
        meta = {"seed": config.seed, "history": history, "clients": clients, CONFIG_HASH: config.content_hash()}
        save_checkpoint(run.out_dir / "checkpoints", round_number, adapted.state(), meta)

    metrics["plugin"] = history[-1]["plugin"]
    metrics["llm_public_only"] = llm_public_only(config, llm_encoded, pad_id, evaluate)
    metrics["federation_gain"] = metrics["plugin"] - metrics["llm_public_only"]
    if slm_accuracy:
        metrics["slm_after"] = float(np.mean(list(slm_accuracy.values())))
    by_partition = {view.partition_id: view for view in views.values()}
    details = {
        "slm": {
            f"client{partition}": {
                "kind": str(method.slm_kind(partition)),
                "slm_before": by_partition[partition].slm_before,
                "slm_after": slm_accuracy.get(partition),
            }
            for partition in sorted(by_partition)
        },
        "alignment": {
            f"client{view.partition_id}": {
                "to_llm": view.to_llm.summary(),
                "from_llm": view.from_llm.summary(),
                "same_tokenizer": view.tokenizer is llm.tokenizer,
            }
            for view in views.values()
        },
        "public_set": {"source": method.public_set, "sequences": len(public)},
    }
    return ServerResult(metrics, history, clients, details=details)


def llm_public_only(config: RunConfig, encoded: Encoded, pad_id: int, evaluate: Any) -> float:
    """Accuracy of the LLM trained by the server's own schedule (same LoRA, steps, seeds) on the same
    public set with no client knowledge: what the federation's contribution is measured against."""
    fresh = load_model(config.model)
    adapted = llm_with_adapter(fresh.model, config)
    for round_number in range(1, config.federation.rounds + 1):
        server_distil(adapted.model, encoded, [None] * len(encoded), pad_id, config, round_number)
    return float(evaluate(adapted.model, fresh.tokenizer, "LLM on the public set alone"))


def llm_with_adapter(model: PreTrainedModel, config: RunConfig) -> AdaptedModel:
    """The LLM with the server's LoRA on every layer (the federated run and the public-only reference alike)."""
    method: FedMKTConfig = config.method_config
    return attach_adapter(model, {i: i for i in range(num_decoder_layers(model))}, method.llm_adapter, seed=config.seed)


def server_distil(
    model: nn.Module,
    encoded: Encoded,
    targets: Sequence[Target | None],
    pad_id: int,
    config: RunConfig,
    round_number: int,
) -> DistilStats:
    """One round of the server's distillation schedule (steps, batch, learning rate, seed) into `model`."""
    method: FedMKTConfig = config.method_config
    return distil(
        model,
        encoded,
        targets,
        pad_id,
        steps=method.server_steps,
        batch_size=method.server_batch_size,
        learning_rate=method.server_learning_rate,
        kd_alpha=method.kd_alpha,
        seed=config.seed * 1_000_003 + round_number,
    )


def average_slms(
    replies: dict[int, RecordDict], views: dict[int, ClientView], usable: dict[int, Knowledge]
) -> dict[str, dict[str, torch.Tensor]]:
    """FedAvg of the SLM weights sent by clients sharing an architecture (groups of two or more)."""
    groups: dict[str, list[ClientUpdate]] = defaultdict(list)
    for node in usable:
        if RecordKey.ADAPTER in replies[node].array_records:
            state = arrays(replies[node], RecordKey.ADAPTER)
            if all(torch.isfinite(t).all() for t in state.values()):
                examples = int(number(replies[node], RecordKey.METRICS, "num_examples"))
                groups[views[node].architecture].append(ClientUpdate(node, state, examples))
    averages = {}
    for architecture, updates in groups.items():
        shapes = {tuple(sorted((name, tuple(t.shape)) for name, t in u.state.items())) for u in updates}
        if len(updates) > 1 and len(shapes) == 1:
            averages[architecture] = _average(updates)
    return averages
