"""Run one configured experiment end to end: federation, reference baselines, results and report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from blindtune.config import RunConfig
from blindtune.federation.apps import FEDERATION_RESULT, build_apps, client_partitions
from blindtune.federation.engine import run_federation
from blindtune.methods import get_method
from blindtune.methods.base import BaselineInputs
from blindtune.preflight import check_model_fits
from blindtune.privacy.audit import run_audits
from blindtune.privacy.report import add_privacy_section
from blindtune.report import write_report
from blindtune.run_folder import prepare_run_folder

log = logging.getLogger(__name__)

RESULTS = "results.json"


class RunFailedError(RuntimeError):
    """The federation did not complete; results.json says why."""


def run_experiment(config: RunConfig, out_dir: Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run `config`, write `out_dir/results.json` and `out_dir/report.md`, and return the results.

    With `resume`, continue the interrupted run in `out_dir` after its last complete round; the config
    must be the one that run used. A fresh run refuses a folder holding another run's outputs
    (`blindtune.run_folder.clear_run_folder` empties it).
    """
    check_model_fits(config)
    prepare_run_folder(out_dir, config, resume)
    started = time.perf_counter()
    federation_file = out_dir / FEDERATION_RESULT
    federation_file.unlink(missing_ok=True)
    server_app, client_app = build_apps(config, out_dir, progress, resume)
    run_federation(server_app, client_app, config.federation.num_clients, config.federation.engine)
    if not federation_file.is_file():
        raise RunFailedError(f"the federation ended without writing {federation_file}")
    federation = json.loads(federation_file.read_text())
    if federation.get("status") != "completed":
        raise RunFailedError(f"the federation failed: {federation.get('error', 'unknown error')}")
    federation_seconds = time.perf_counter() - started

    method = get_method(config.method)
    inputs = BaselineInputs(
        config=config,
        task=config.load_task(),
        client_examples=client_partitions(config),
        progress=progress,
    )
    metrics = federation["metrics"]
    if config.baselines.centralized:
        metrics["centralized"] = method.centralized(inputs)
    if config.baselines.local_only:
        metrics["local_only"] = method.local_only(inputs)

    cost = federation["cost"]
    train_seconds = sum(float(row.get("train_seconds", 0.0)) for row in federation["clients"])
    train_tokens = sum(float(row.get("train_tokens", 0.0)) for row in federation["clients"])
    cost["wall_seconds"] = time.perf_counter() - started
    cost["federation_wall_seconds"] = federation_seconds
    cost["train_tokens_per_second"] = train_tokens / train_seconds if train_seconds else 0.0
    results = {
        "method": config.method,
        "model": config.model,
        "task": config.task,
        "num_clients": config.federation.num_clients,
        "rounds": config.federation.rounds,
        "metrics": metrics,
        "cost": cost,
        "failures": federation["failures"],
        "history": federation["history"],
        "clients": federation["clients"],
        "details": {
            k: v
            for k, v in federation.items()
            if k not in {"metrics", "cost", "failures", "history", "clients", "status"}
        },
        "config": config.to_dict(),
    }
    # What the privacy protections spent, the ledger check, and the audits the config asks for.
    results["privacy"] = run_audits(config, out_dir, results, progress=progress)
    (out_dir / RESULTS).write_text(json.dumps(results, indent=2))
    write_report([results], out_dir, title=f"blindtune {config.method} on {config.task}")
    add_privacy_section(out_dir / "report.md", [results])
    return results
