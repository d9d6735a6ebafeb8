"""Rounds shared by every method whose clients train an adapter on a model the server hands out
(offsite tuning's emulator, LLEOT's elevated emulator, ...).

Server: `hand_out` sends the artefact once; `run_rounds` sends the global adapter, collects the
clients' adapters, screens and aggregates them, checkpoints, and lets the method evaluate.
Client: `store_artefact` answers the setup message; `train_round` answers each round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn

from blindtune.data import Example
from blindtune.federation.aggregation import ClientUpdate
from blindtune.federation.checkpoint import CONFIG_HASH, latest_checkpoint, save_checkpoint
from blindtune.federation.ledger import Direction
from blindtune.federation.progress import RoundProgress
from blindtune.federation.records import MessageKind, RecordKey, arrays, number, tensors_to_record
from blindtune.federation.rounds import Exchange, TooFewClientsError
from blindtune.federation.secagg import secure_round
from blindtune.federation.strategies import FedAvg
from blindtune.models.adapters import AdapterState
from blindtune.models.artefact import (
    ArtefactSpec,
    describe,
    load_artefact,
    save_artefact,
    stored_mlp_channels,
    unique_state_dict,
)
from blindtune.models.compact import MlpChannels, compacted
from blindtune.models.loading import LoadedModel
from blindtune.privacy.context import active_client_privacy, active_server_privacy, require_client_dp
from blindtune.privacy.secagg import secagg_summary
from blindtune.privacy.server_dp import ServerSideDP
from blindtune.training import TrainConfig, train

if TYPE_CHECKING:
    from blindtune.config import RunConfig

log = logging.getLogger(__name__)

ADAPTER_POSITIONS = "adapter_positions"
ADAPTER_SOURCES = "adapter_sources"
ROUND = "round"
SEED = "seed"
PROXIMAL_MU = "proximal_mu"
LAYER_MAP_FILE = "adapter_layers.json"


# ---- server side -------------------------------------------------------------------------------


def hand_out(
    exchange: Exchange,
    artefact: LoadedModel,
    layer_map: dict[int, int],
    min_replies: int,
    channels: MlpChannels | None = None,
) -> None:
    """Send the artefact (weights, config, tokenizer) and its adapter layer map to every client.

    Channels the artefact zeroed are not sent: clients get it compact (`blindtune.models.compact`)
    and train at its real size, while the adapters still travel in the LLM's shapes. `channels`: the
    artefact is compact already, with these channels (the caller compacted it to score it)."""
    model, channels = (artefact.model, channels) if channels is not None else compacted(artefact.model)
    shipped = LoadedModel(model, artefact.tokenizer, artefact.name)
    setup = RecordDict(
        {
            RecordKey.ARTEFACT: tensors_to_record(unique_state_dict(model)),
            RecordKey.ARTEFACT_SPEC: ConfigRecord({"json": describe(shipped, channels).to_json()}),
            RecordKey.INSTRUCTIONS: ConfigRecord(
                {ADAPTER_POSITIONS: list(layer_map), ADAPTER_SOURCES: list(layer_map.values())}
            ),
        }
    )
    exchange.send(MessageKind.SETUP, same_for_all(setup), exchange.node_ids(), 0, min_replies)


@dataclass
class RoundSettings:
    rounds: int
    min_replies: int
    max_update_norm_ratio: float
    seed: int
    evaluate_every_round: bool
    checkpoint_dir: Path
    resume: bool = False  # continue after the last complete checkpoint in checkpoint_dir
    config_hash: str | None = None  # the run config's hash, written into (and checked against) checkpoints
    server_learning_rate: float = 1.0

    @classmethod
    def of_run(cls, config: RunConfig, checkpoint_dir: Path, resume: bool) -> RoundSettings:
        """The settings a run config's `federation`, `seed` and `eval` sections give the round loop."""
        return cls(
            rounds=config.federation.rounds,
            min_replies=config.federation.required_replies,
            max_update_norm_ratio=config.federation.max_update_norm_ratio,
            seed=config.seed,
            evaluate_every_round=config.eval.every_round,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            config_hash=config.content_hash(),
            server_learning_rate=config.federation.server_learning_rate,
        )


@dataclass
class RoundsOutcome:
    state: AdapterState
    history: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)


def run_rounds(
    exchange: Exchange,
    initial_state: AdapterState,
    settings: RoundSettings,
    strategy: FedAvg,
    llm: nn.Module,
    evaluate: Callable[[nn.Module, int], float],
    diagnose: Callable[[AdapterState, int], dict[str, float]] | None = None,
) -> RoundsOutcome:
    """Federated rounds of adapter training; `evaluate(model, round)` scores the LLM with the global
    adapter plugged in (however the strategy plugs it); `diagnose(state, round)`, when given, adds
    the method's own measures of the global adapter to the same rows (history)."""
    outcome = RoundsOutcome(state=strategy.initial_global(initial_state))
    first_round = 1
    if settings.resume and (checkpoint := latest_checkpoint(settings.checkpoint_dir, settings.config_hash)) is not None:
        last_round, outcome.state, meta = checkpoint
        outcome.history, outcome.clients = meta["history"], meta["clients"]
        first_round = last_round + 1
        log.info("resuming after round %d from %s", last_round, settings.checkpoint_dir)
    nodes = exchange.node_ids()
    # Secure aggregation / server-side DP / checks of client DP, when the server's policy asks for them.
    privacy = active_server_privacy()
    secagg, server_dp = _server_protections(privacy, strategy, first_round)
    progress = RoundProgress(first_round, settings.rounds)
    for round_number in range(first_round, settings.rounds + 1):
        previous = outcome.state
        content = RecordDict(
            {
                RecordKey.ADAPTER: tensors_to_record(outcome.state),
                RecordKey.INSTRUCTIONS: ConfigRecord(
                    {ROUND: round_number, SEED: settings.seed, PROXIMAL_MU: strategy.proximal_mu}
                ),
            }
        )
        sent = time.perf_counter()
        if secagg is not None:  # the server learns only the clients' weighted mean
            mean, replies = secure_round(
                exchange,
                outcome.state,
                strategy.returned_names(outcome.state),
                content[RecordKey.INSTRUCTIONS],  # type: ignore[arg-type]
                round_number,
                settings.min_replies,
                secagg,
            )
            round_seconds = time.perf_counter() - sent
            outcome.state = {**outcome.state, **mean}
            kept_nodes = set(replies)
        else:
            replies = exchange.send(MessageKind.TRAIN, same_for_all(content), nodes, round_number, settings.min_replies)
            round_seconds = time.perf_counter() - sent
            updates = [
                ClientUpdate(
                    node,
                    arrays(reply, RecordKey.ADAPTER),
                    int(number(reply, RecordKey.METRICS, "num_examples")),
                )
                for node, reply in replies.items()
            ]
            kept, rejected = strategy.screen(updates, outcome.state, settings.max_update_norm_ratio)
            for rejection in rejected:
                exchange.fail(round_number, rejection.node_id, rejection.reason)
            if len(kept) < settings.min_replies:
                raise TooFewClientsError(
                    f"round {round_number}: {len(kept)} usable client updates, {settings.min_replies} required"
                )
            if server_dp is not None:  # clipped, uniformly averaged, noised: Flower's DP wrapper
                names = strategy.returned_names(outcome.state)
                states = {update.node_id: update.state for update in kept}
                outcome.state = server_dp.aggregate(round_number, states, outcome.state, names, exchange.grid)
            else:
                outcome.state = strategy.aggregate(kept, outcome.state)
            kept_nodes = {update.node_id for update in kept}
        outcome.state = server_step(previous, outcome.state, settings.server_learning_rate)
        used_metrics = {node: replies[node].metric_records.get(RecordKey.METRICS) for node in kept_nodes}
        dp_epsilon = require_client_dp(privacy, used_metrics, round_number)  # None: client DP is off
        for node, reply in replies.items():
            outcome.clients.append(
                {
                    "round": round_number,
                    "node_id": node,
                    "used": node in kept_nodes,
                    **dict(reply[RecordKey.METRICS]),
                }
            )
        losses = [
            number(replies[node], RecordKey.METRICS, "train_loss")
            for node in kept_nodes
            if "train_loss" in replies[node][RecordKey.METRICS]
        ]
        bytes_this_round = exchange.ledger.bytes_by_round[round_number]
        row: dict[str, Any] = {
            "round": round_number,
            "train_loss": sum(losses) / len(losses) if losses else None,  # None: not released under DP
            "bytes_to_clients": bytes_this_round[Direction.TO_CLIENTS],
            "bytes_to_server": bytes_this_round[Direction.TO_SERVER],
            **round_timing(round_seconds, replies.values()),
        }
        if dp_epsilon is not None:
            row["dp_epsilon"] = dp_epsilon
        if server_dp is not None:
            row["server_dp_epsilon"] = server_dp.summary()["epsilon"]
            privacy.report["server_dp"] = server_dp.summary()  # type: ignore[union-attr]
        if settings.evaluate_every_round or round_number == settings.rounds:
            with strategy.plugged_in(llm, outcome.state) as adapted:
                row["plugin"] = evaluate(adapted, round_number)
            if diagnose is not None:
                row.update(diagnose(outcome.state, round_number))
        log.info("round %d: %s", round_number, row)
        outcome.history.append(row)
        # Written last, so a checkpoint exists only for a round that finished completely.
        meta = {
            "seed": settings.seed,
            "history": outcome.history,
            "clients": outcome.clients,
            CONFIG_HASH: settings.config_hash,
        }
        save_checkpoint(settings.checkpoint_dir, round_number, outcome.state, meta)
        progress.round_done(round_number, len(replies), len(nodes), row["train_loss"])
    return outcome


def server_step(previous: AdapterState, aggregated: AdapterState, learning_rate: float) -> AdapterState:
    """previous + learning_rate x (aggregated - previous), tensor by tensor (the aggregate as is at 1)."""
    if learning_rate == 1:
        return aggregated
    return {
        name: (previous[name] + learning_rate * (value - previous[name])) if name in previous else value
        for name, value in aggregated.items()
    }


def _server_protections(privacy: Any, strategy: FedAvg, first_round: int) -> tuple[Any, Any]:
    """SecAgg+ settings and a server-side DP aggregator, each None when the policy does not ask for it."""
    if privacy is None:
        return None, None
    privacy.applied = True
    config = privacy.config
    if config.server_side and type(strategy).aggregate is not FedAvg.aggregate:
        raise ValueError(
            f"strategy {strategy.name} does not aggregate by a weighted mean, which secure aggregation and "
            "server-side DP compute"
        )
    if config.secagg.enabled:
        privacy.report["secagg"] = secagg_summary(config.secagg)
        return config.secagg, None
    if config.server_dp.enabled:
        return None, ServerSideDP(config.server_dp, rounds_done=first_round - 1)
    return None, None


TRAINED_IDS_FILE = "trained_ids.json"


def record_trained(workdir: Path, indices: Iterable[int]) -> None:
    """Add the indices (into this client's examples) of those it trained on to its own record, which
    stays with the client: only the membership audit reads it, to draw real members."""
    path = workdir / TRAINED_IDS_FILE
    known = set(json.loads(path.read_text())) if path.is_file() else set()
    path.write_text(json.dumps(sorted(known | set(indices))))


def trained_ids(workdir: Path) -> list[int]:
    """The indices a client recorded with `record_trained` (empty when it recorded none)."""
    path = workdir / TRAINED_IDS_FILE
    return list(json.loads(path.read_text())) if path.is_file() else []


def round_timing(round_seconds: float, replies: Iterable[RecordDict]) -> dict[str, float]:
    """How a round's time went: `round_seconds` from sending the round to the last reply, the
    clients' mean training time in it, and their mean idle time (the round's time not spent
    training: starting up, loading, waiting for a core or for the others)."""
    metrics = [reply.metric_records.get(RecordKey.METRICS) for reply in replies]
    train = [float(m["train_seconds"]) for m in metrics if m is not None and "train_seconds" in m]  # type: ignore[arg-type]
    if not train:
        return {"round_seconds": round_seconds}
    mean_train = sum(train) / len(train)
    return {
        "round_seconds": round_seconds,
        "client_train_seconds": mean_train,
        "client_idle_seconds": max(0.0, round_seconds - mean_train),
    }


def same_for_all(content: RecordDict) -> Callable[[int], RecordDict]:
    """A per-node content function that sends every node the same message."""
    return lambda _node: content


# ---- client side -------------------------------------------------------------------------------


def store_artefact(content: RecordDict, workdir: Path) -> RecordDict:
    """Keep the handed-out artefact and its adapter layer map in the client's work directory."""
    spec = ArtefactSpec.from_json(str(content[RecordKey.ARTEFACT_SPEC]["json"]))
    tensors = arrays(content, RecordKey.ARTEFACT)
    save_artefact(workdir, spec, tensors)
    instructions = content[RecordKey.INSTRUCTIONS]
    positions = [int(p) for p in instructions[ADAPTER_POSITIONS]]  # type: ignore[union-attr]
    sources = [int(s) for s in instructions[ADAPTER_SOURCES]]  # type: ignore[union-attr]
    (workdir / LAYER_MAP_FILE).write_text(json.dumps(dict(zip(positions, sources, strict=True))))
    return RecordDict(
        {RecordKey.METRICS: MetricRecord({"artefact_parameters": sum(t.numel() for t in tensors.values())})}
    )


def train_round(
    content: RecordDict,
    workdir: Path,
    examples: list[Example],
    strategy: FedAvg,
    train_config: TrainConfig,
    client_index: int,
    lora_rank: int | None = None,
) -> RecordDict:
    """Load the stored artefact, attach the global adapter as the strategy says, train on private
    examples, reply with the trained part of the adapter (in the LLM's shapes, also from a compact
    artefact)."""
    artefact = load_artefact(workdir)
    channels = stored_mlp_channels(workdir)
    layer_map = {int(k): v for k, v in json.loads((workdir / LAYER_MAP_FILE).read_text()).items()}
    seed = int(number(content, RecordKey.INSTRUCTIONS, SEED))
    round_number = int(number(content, RecordKey.INSTRUCTIONS, ROUND))
    received = arrays(content, RecordKey.ADAPTER)
    adapted = strategy.prepare_client(
        artefact.model, channels.compact_state(received, layer_map), layer_map, lora_rank, seed
    )
    train_config = dataclasses.replace(train_config, proximal_mu=number(content, RecordKey.INSTRUCTIONS, PROXIMAL_MU))
    privacy = active_client_privacy()
    dp_metrics: dict[str, float | int] = {}
    if privacy is not None and privacy.config.dp.enabled:  # DP-SGD; refuses (raises) rather than train without
        from blindtune.privacy.dp import train_private

        stats, spent = train_private(
            adapted.model,
            artefact.tokenizer,
            examples,
            train_config,
            privacy.config.dp,
            workdir,
            seed=seed * 1_000_003 + round_number * 1009 + client_index,
            round_number=round_number,
            planned_rounds=privacy.planned_rounds,
            progress=False,
            desc=f"client {client_index} round {round_number} (DP)",
        )
        dp_metrics = spent.metrics()
    else:
        stats = train(
            adapted.model,
            artefact.tokenizer,
            examples,
            train_config,
            seed=seed * 1_000_003 + round_number * 1009 + client_index,
            progress=False,
            desc=f"client {client_index} round {round_number}",
        )
    record_trained(workdir, stats.trained_indices)
    # Under DP the loss, token and example counts of the private batches are not released: they were
    # computed on the records without noise (the ledger check fails a DP run that sends them).
    data_metrics = (
        {}
        if dp_metrics
        else {"examples_seen": stats.examples_seen, "train_loss": stats.mean_loss, "train_tokens": stats.tokens_seen}
    )
    return RecordDict(
        {
            RecordKey.ADAPTER: tensors_to_record(channels.full_state(adapted.state(), received, layer_map)),
            RecordKey.METRICS: MetricRecord(
                {"num_examples": len(examples), "train_seconds": stats.seconds, **data_metrics, **dp_metrics}
            ),
        }
    )
