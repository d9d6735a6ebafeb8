"""Offsite tuning, client side: store the emulator once, then train the adapter on it each round.

The client never sees the LLM: only the emulator (setup message) and the global adapter (each round).
"""

from __future__ import annotations

import json

from flwr.app import MetricRecord, RecordDict

from blindtune.federation.records import MessageKind, RecordKey, record_to_tensors, tensors_to_record
from blindtune.methods.base import ClientRun
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.methods.offsite.server import ADAPTER_POSITIONS, ADAPTER_SOURCES, ROUND, SEED
from blindtune.models.adapters import attach_adapter
from blindtune.models.artefact import ArtefactSpec, load_artefact, save_artefact
from blindtune.training import train

_LAYER_MAP = "adapter_layers.json"


def handle(kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
    if kind is MessageKind.SETUP:
        return _store_emulator(content, run)
    return _train_round(content, run)


def _store_emulator(content: RecordDict, run: ClientRun) -> RecordDict:
    spec = ArtefactSpec.from_json(str(content[RecordKey.ARTEFACT_SPEC]["json"]))
    tensors = record_to_tensors(content[RecordKey.ARTEFACT])
    save_artefact(run.workdir, spec, tensors)
    instructions = content[RecordKey.INSTRUCTIONS]
    layer_map = dict(zip(instructions[ADAPTER_POSITIONS], instructions[ADAPTER_SOURCES], strict=True))  # type: ignore[call-overload]
    (run.workdir / _LAYER_MAP).write_text(json.dumps(layer_map))
    return RecordDict({RecordKey.METRICS: MetricRecord({"artefact_parameters": sum(t.numel() for t in tensors.values())})})


def _train_round(content: RecordDict, run: ClientRun) -> RecordDict:
    method: OffsiteConfig = run.config.method_config
    emulator = load_artefact(run.workdir)
    layer_map = {int(k): v for k, v in json.loads((run.workdir / _LAYER_MAP).read_text()).items()}
    adapted = attach_adapter(emulator.model, layer_map, method.adapter)
    adapted.load_state(record_to_tensors(content[RecordKey.ADAPTER]))
    instructions = content[RecordKey.INSTRUCTIONS]
    round_number = int(instructions[ROUND])  # type: ignore[arg-type]
    stats = train(
        adapted.model,
        emulator.tokenizer,
        run.examples,
        run.config.train,
        seed=int(instructions[SEED]) * 1_000_003 + round_number * 1009 + run.partition_id,  # type: ignore[arg-type]
        progress=False,
        desc=f"client {run.partition_id} round {round_number}",
    )
    return RecordDict(
        {
            RecordKey.ADAPTER: tensors_to_record(adapted.state()),
            RecordKey.METRICS: MetricRecord(
                {
                    "num_examples": len(run.examples),
                    "examples_seen": stats.examples_seen,
                    "train_loss": stats.mean_loss,
                    "train_seconds": stats.seconds,
                    "train_tokens": stats.tokens_seen,
                }
            ),
        }
    )
