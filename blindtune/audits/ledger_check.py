"""The ledger check: did any client's raw text reach the server?

`TrafficAudit` sits between the server and its Grid and reads every reply the server receives,
whatever the method or protocol (SecAgg+ stages included). It keeps every text-bearing value: strings
and bytes that decode as UTF-8 text, in config records (metric records hold only numbers, and array
records numbers by construction; integer arrays, which could carry token ids, are counted). After the
run, `check` compares those texts with the clients' private text: each training prompt's lines that
are particular to that example (template lines shared by many prompts are public). A text leaks if it
contains such a line (or its content after a short `Label: ` prefix) verbatim, or shares a run of
`SHINGLE_WORDS` consecutive words with one.

Under DP-SGD the check also fails a run whose clients send per-client values computed on their records
without noise (`UNNOISED_UNDER_DP`: training loss, token and example counts of the private batches):
the DP guarantee covers only what went through the mechanism.

A method that explicitly sends privatised text (FedCoT's privatised rationales) names the records
that carry it in `privatised_text_records`; texts there are counted as privatised, and must not leak
raw text either. The check does not judge how private a privatised text is, nor find text hidden in
binary encodings.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from blindtune.data import Example
from blindtune.federation.grids import DelegatingGrid

SHINGLE_WORDS = 6
MIN_FRAGMENT_CHARS = 12
MAX_KEPT_TEXTS = 20_000
_WORD = re.compile(r"\w+")
UNNOISED_UNDER_DP = frozenset({"train_loss", "train_tokens", "examples_seen"})


@dataclass
class ReceivedText:
    message_type: str
    record: str
    key: str
    text: str


class TrafficAudit(DelegatingGrid):
    """A Grid wrapper that keeps the text-bearing values of every reply the server receives."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.texts: list[ReceivedText] = []
        self.replies = 0
        self.integer_arrays: Counter[str] = Counter()
        self.values_by_record: Counter[str] = Counter()
        self.metric_keys: Counter[str] = Counter()  # "record/key" of every number in a metric record

    def incoming(self, replies: list[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                continue
            self.replies += 1
            message_type = str(reply.metadata.message_type)
            for name, record in reply.content.items():
                self.values_by_record[name] += 1
                if isinstance(record, ArrayRecord):
                    for key, array in record.items():
                        if not np.issubdtype(np.dtype(array.dtype), np.floating):
                            self.integer_arrays[f"{name}/{key}"] += 1
                elif isinstance(record, MetricRecord):
                    self.metric_keys.update(f"{name}/{key}" for key in record)
                elif isinstance(record, ConfigRecord):
                    for key, value in record.items():
                        for text in _texts(value):
                            if len(self.texts) < MAX_KEPT_TEXTS:
                                self.texts.append(ReceivedText(message_type, name, key, text))


def _texts(value: Any) -> Iterable[str]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, bytes):
            try:
                yield item.decode("utf-8")
            except UnicodeDecodeError:
                continue  # binary: keys, ciphertexts, masked vectors, serialised arrays


def private_fragments(examples: Sequence[Example], shared_fraction: float = 0.01) -> list[str]:
    """Each prompt's lines that are particular to its example (and those lines without a short label)."""
    lines = [[line.strip() for line in example.prompt.splitlines() if line.strip()] for example in examples]
    counts = Counter(line for example_lines in lines for line in set(example_lines))
    limit = max(2, int(shared_fraction * len(examples)))
    fragments: set[str] = set()
    for example_lines in lines:
        for line in example_lines:
            if counts[line] >= limit:
                continue  # template lines (instructions, option lists) are public
            candidates = [line]
            label, separator, rest = line.partition(": ")
            if separator and len(label) <= 20:
                candidates.append(rest.strip())
            fragments.update(c for c in candidates if len(c) >= MIN_FRAGMENT_CHARS)
    return sorted(fragments)


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def check(
    audit: TrafficAudit,
    client_examples: Sequence[Sequence[Example]],
    privatised_records: Collection[str] = (),
    dp_enabled: bool = False,
) -> dict[str, Any]:
    """The ledger check's verdict and figures (JSON-ready); `dp_enabled`: the clients train under
    DP-SGD, so un-noised per-client values they send fail the check."""
    fragments = private_fragments([example for examples in client_examples for example in examples])
    shingles = set().union(*(_shingles(fragment) for fragment in fragments)) if fragments else set()
    leaks = []
    privatised = other = 0
    for received in audit.texts:
        if received.record in privatised_records:
            privatised += 1
        else:
            other += 1
        verbatim = next((f for f in fragments if f in received.text), None)
        shared = None if verbatim is not None else next(iter(_shingles(received.text) & shingles), None)
        if verbatim is not None or shared is not None:
            leaks.append(
                {
                    "record": received.record,
                    "key": received.key,
                    "message_type": received.message_type,
                    "match": verbatim if verbatim is not None else " ".join(shared or ()),
                }
            )
    unnoised = (
        sorted(key for key in audit.metric_keys if key.rpartition("/")[2] in UNNOISED_UNDER_DP) if dp_enabled else []
    )
    return {
        "passed": not leaks and not unnoised,
        "unnoised_metrics_under_dp": unnoised,
        "replies_checked": audit.replies,
        "client_fragments": len(fragments),
        "texts_received": len(audit.texts),
        "privatised_texts_received": privatised,
        "other_texts_received": other,
        "privatised_records": sorted(privatised_records),
        "raw_text_leaks": len(leaks),
        "leak_examples": leaks[:5],
        "integer_arrays_received": dict(audit.integer_arrays),
        "records_received": dict(audit.values_by_record),
    }
