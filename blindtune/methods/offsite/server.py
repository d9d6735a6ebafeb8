"""Offsite tuning, server side.

    blindtune run configs/offsite_wordnet_3clients.yaml --out runs/offsite

1. Build the emulator: the LLM with its middle block uniformly sub-sampled; the bottom/top k layers
   (the adapter) are kept intact so a trained adapter fits the LLM again.
2. Hand the emulator (never the LLM) to every client once.
3. Each round: send the global adapter, collect the clients' trained adapters, screen and FedAvg
   them (weighted by examples), checkpoint, and evaluate the LLM with the adapter plugged in.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from blindtune.data import load_task
from blindtune.eval.tasks import evaluate_examples
from blindtune.federation.aggregation import ClientUpdate, fedavg, screen
from blindtune.federation.checkpoint import save_checkpoint
from blindtune.federation.records import MessageKind, RecordKey, record_to_tensors, tensors_to_record
from blindtune.federation.rounds import TooFewClientsError
from blindtune.methods.base import ServerRun
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.models import load_model
from blindtune.models.adapters import plugged_in, untrained_adapter_state
from blindtune.models.artefact import describe, unique_state_dict
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import LayerPlan, build_emulator, num_decoder_layers, plan_layers

log = logging.getLogger(__name__)

ADAPTER_POSITIONS = "adapter_positions"
ADAPTER_SOURCES = "adapter_sources"
ROUND = "round"
SEED = "seed"


def emulator_plan(llm: LoadedModel, method: OffsiteConfig) -> LayerPlan:
    return plan_layers(num_decoder_layers(llm.model), method.adapter_layers_per_side, method.middle_keep_every)


def adapter_layer_map(plan: LayerPlan) -> dict[int, int]:
    """Emulator position -> LLM layer index, for the adapter layers only."""
    return {plan.emulator_position_of[source]: source for source in plan.adapter_layers}


def run_server(run: ServerRun) -> dict[str, Any]:
    config = run.config
    method: OffsiteConfig = config.method_config
    llm = load_model(config.model)
    task = load_task(config.task, config.data_dir, seed=config.seed)
    test = task.test[: config.eval.limit]

    def evaluate(model: Any, desc: str) -> float:
        return evaluate_examples(
            model,
            llm.tokenizer,
            test,
            task.kind,
            batch_size=config.eval.batch_size,
            length_normalized=config.eval.length_normalized,
            progress=run.progress,
            desc=desc,
        )

    plan = emulator_plan(llm, method)
    emulator = build_emulator(llm.model, plan)
    metrics: dict[str, float] = {"llm_zero_shot": evaluate(llm.model, "LLM zero-shot")}
    metrics["emulator_zero_shot"] = evaluate(emulator, "emulator zero-shot")

    layer_map = adapter_layer_map(plan)
    global_state = untrained_adapter_state(copy.deepcopy(emulator), layer_map, method.adapter, config.seed)
    exchange = run.exchange
    nodes = exchange.node_ids()
    setup = RecordDict(
        {
            RecordKey.ARTEFACT: tensors_to_record(unique_state_dict(emulator)),
            RecordKey.ARTEFACT_SPEC: ConfigRecord({"json": describe(LoadedModel(emulator, llm.tokenizer, "")).to_json()}),
            RecordKey.INSTRUCTIONS: ConfigRecord(
                {ADAPTER_POSITIONS: list(layer_map), ADAPTER_SOURCES: list(layer_map.values())}
            ),
        }
    )
    del emulator
    exchange.send(MessageKind.SETUP, lambda _: setup, nodes, 0, config.federation.required_replies)

    history: list[dict[str, Any]] = []
    client_rows: list[dict[str, Any]] = []
    for round_number in range(1, config.federation.rounds + 1):
        content = RecordDict(
            {
                RecordKey.ADAPTER: tensors_to_record(global_state),
                RecordKey.INSTRUCTIONS: ConfigRecord({ROUND: round_number, SEED: config.seed}),
            }
        )
        replies = exchange.send(
            MessageKind.TRAIN, lambda _: content, nodes, round_number, config.federation.required_replies
        )
        updates = [
            ClientUpdate(node, record_to_tensors(reply[RecordKey.ADAPTER]), int(reply[RecordKey.METRICS]["num_examples"]))
            for node, reply in replies.items()
        ]
        kept, rejected = screen(updates, global_state, config.federation.max_update_norm_ratio)
        for rejection in rejected:
            exchange.fail(round_number, rejection.node_id, rejection.reason)
        if len(kept) < config.federation.required_replies:
            raise TooFewClientsError(f"round {round_number}: only {len(kept)} usable client updates")
        global_state = fedavg(kept)
        save_checkpoint(run.out_dir / "checkpoints", round_number, global_state, {"method": config.method})

        kept_nodes = {u.node_id for u in kept}
        for node, reply in replies.items():
            client_metrics = dict(reply[RecordKey.METRICS])
            client_rows.append({"round": round_number, "node_id": node, "used": node in kept_nodes, **client_metrics})
        row: dict[str, Any] = {
            "round": round_number,
            "train_loss": sum(float(replies[u.node_id][RecordKey.METRICS]["train_loss"]) for u in kept) / len(kept),
            "bytes_to_clients": exchange.ledger.bytes_by_round[round_number]["to_clients"],
            "bytes_to_server": exchange.ledger.bytes_by_round[round_number]["to_server"],
        }
        if config.eval.every_round or round_number == config.federation.rounds:
            with plugged_in(llm.model, global_state, method.adapter) as adapted:
                row["plugin"] = evaluate(adapted, f"plug-in round {round_number}")
        log.info("round %d: %s", round_number, row)
        history.append(row)

    metrics["plugin"] = history[-1]["plugin"]
    return {
        "metrics": metrics,
        "history": history,
        "clients": client_rows,
        "emulator": {"llm_layers": plan.num_llm_layers, "emulator_layers": list(plan.emulator_layers)},
    }
