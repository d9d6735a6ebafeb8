"""What crosses a party boundary: Flower records with fixed keys, converted from/to torch tensors.

Only `ArrayRecord`s (numpy arrays serialised without pickle), `ConfigRecord`s and `MetricRecord`s
travel; the keys below are the complete vocabulary, so the ledger can name what every byte was.
"""

from __future__ import annotations

import enum

import torch
from flwr.app import ArrayRecord, RecordDict


class MessageKind(enum.StrEnum):
    """Flower message types ("<category>.<action>") used by blindtune's apps."""

    SETUP = "query.setup"  # the server hands out the artefact clients train on (emulator, proxy)
    TRAIN = "train"  # one round of local training on the current global adapter


class RecordKey(enum.StrEnum):
    ARTEFACT = "artefact"  # weights of the emulator/proxy handed to clients (ArrayRecord)
    ARTEFACT_SPEC = "artefact_spec"  # its architecture config and tokenizer, as JSON bytes (ConfigRecord)
    ADAPTER = "adapter"  # adapter/LoRA weights, either direction (ArrayRecord)
    INSTRUCTIONS = "instructions"  # round number, local steps, seeds (ConfigRecord)
    METRICS = "metrics"  # client training metrics (MetricRecord)
    # FedMKT (mutual knowledge transfer through distributions on public text):
    PUBLIC_SET = "public_set"  # the server's public (prompt, reference continuation) pairs, as text (ConfigRecord)
    TOKENIZER = "tokenizer"  # a client model's tokenizer: tokenizer.json text + special tokens, or a note that it
    # is the handed-out artefact's (ConfigRecord); vocabularies are needed to align distributions
    KNOWLEDGE = "knowledge"  # top-K next-token distributions on the public set (ArrayRecord: `indices` int32
    # and `logits` float32 (positions, K), `lengths` int32 per sequence, `losses` float32 per sequence;
    # see blindtune.methods.fedmkt.knowledge)
    # FedCoT: a client's prompts after text privatisation, the only client text the server receives
    # (ConfigRecord, key "texts": list of strings, in the client's order)
    PRIVATISED_PROMPTS = "privatised_prompts"
    # FedCoT: the server LLM's rationales, one per privatised prompt, same order (ConfigRecord, key "texts")
    RATIONALES = "rationales"


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def record_bytes(content: RecordDict) -> dict[str, int]:
    """Payload bytes of each record in a message, keyed by record name."""
    return {name: record.count_bytes() for name, record in content.items()}


def arrays(content: RecordDict, key: RecordKey) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord in a message (a clear error if the record is missing)."""
    if key not in content.array_records:
        raise ValueError(f"message has no array record {key!r}")
    return record_to_tensors(content.array_records[key])


def number(content: RecordDict, record: RecordKey, key: str) -> float:
    """A scalar from a Metric/ConfigRecord in a message (a clear error if absent or not a number)."""
    values = content.metric_records.get(record) or content.config_records.get(record)
    value = None if values is None else values.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"message record {record!r} has no number {key!r} (got {value!r})")
    return float(value)
