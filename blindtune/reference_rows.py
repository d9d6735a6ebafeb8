"""Reference rows (centralised, local-only) cached by their inputs, so a rerun of a setting does not
retrain them.

A reference row's accuracy is decided by the LLM's weights, the code that trains it and every setting of
the run except those that only change how the federation is carried out or what else is measured
(`NOT_DECIDING`). The cache key hashes exactly those; the entry lives in the user cache next to the
converted models (`blindtune.models.loading.cache_dir`). Bump `CACHE_VERSION` when a method's reference
training changes, so old entries are not reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from blindtune.config import RunConfig, flat_config
from blindtune.models import load_model
from blindtune.models.loading import cache_dir, model_fingerprint, written_atomically

log = logging.getLogger(__name__)

# 2: local only trains on the compact hand-out from the federation's starting adapter (632243e).
CACHE_VERSION = 2
# Settings that do not change a reference row: how the federation runs, which rows are asked for,
# what is measured besides accuracy (the hand-out's leakage), the audits and privacy reports.
NOT_DECIDING_PREFIXES = ("baselines.", "privacy.audit.", "eval.every_round", "eval.round_limit", "federation.engine")
NOT_DECIDING_PARTS = (".privacy.",)


@dataclass
class ReferenceRow:
    value: float
    from_cache: bool
    seconds: float  # spent now: computing it, or reading it from the cache


def reference_key(name: str, config: RunConfig, llm_fingerprint: str) -> str:
    flat = flat_config(config.to_dict())
    deciding = {
        key: value
        for key, value in flat.items()
        if not key.startswith(NOT_DECIDING_PREFIXES) and not any(part in key for part in NOT_DECIDING_PARTS)
    }
    payload = json.dumps([CACHE_VERSION, name, llm_fingerprint, deciding], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def llm_fingerprint(config: RunConfig) -> str:
    """The identity of the run's LLM weights (one load per run: every row of the run shares it)."""
    return model_fingerprint(load_model(config.model).model)


def cached_reference(
    name: str, config: RunConfig, compute: Callable[[], float], fingerprint: str, use_cache: bool = True
) -> ReferenceRow:
    """The row's value from the cache when these inputs were computed before; else computed and stored."""
    started = time.perf_counter()
    path = cache_dir() / "reference_rows" / f"{name}-{reference_key(name, config, fingerprint)}.json"
    if use_cache and path.is_file():
        value = float(json.loads(path.read_text())["value"])
        log.info("reference row %s from the cache (%s)", name, path)
        return ReferenceRow(value, True, time.perf_counter() - started)
    value = compute()
    with written_atomically(path) as temporary:
        temporary.write_text(json.dumps({"name": name, "value": value, "method": config.method, "task": config.task}))
    return ReferenceRow(value, False, time.perf_counter() - started)
