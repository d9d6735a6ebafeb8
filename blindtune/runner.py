"""Run one configured experiment end to end: federation, reference baselines, results and report.

The runner assembles a run: the method (`blindtune.methods`), the apps that run it
(`blindtune.federation.apps`, with the run-level ledger check watching the server's traffic), the
federation that runs the apps (in this process or on Flower's simulation engine, or, from `launch`,
a loopback deployment), and afterwards the baselines, the audits and the report.
`server_app` / `client_app` below are the Flower App that a deployment's processes load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from blindtune.audits.audit import LedgerCheck, ServerFigures, run_audits
from blindtune.audits.report import add_privacy_section
from blindtune.config import RunConfig
from blindtune.data import TaskKind
from blindtune.federation.apps import FEDERATION_RESULT, FederationRecord, build_apps, client_partitions
from blindtune.federation.deployment import AppComponents, DeploymentOptions, TlsFiles, run_deployment
from blindtune.federation.engine import run_federation
from blindtune.federation.flower_app import DeployedApps
from blindtune.methods import config_class, get_method
from blindtune.methods.base import BaselineInputs
from blindtune.models.device import placed
from blindtune.preflight import check_model_fits
from blindtune.reference_rows import cached_reference, llm_fingerprint
from blindtune.report import write_report
from blindtune.run_folder import prepare_run_folder

log = logging.getLogger(__name__)

RESULTS = "results.json"

# Runs the federation of (config, out_dir, resume) to completion; it writes out_dir/federation.json.
FederationRunner = Callable[[RunConfig, Path, bool], object]


class RunFailedError(RuntimeError):
    """The federation did not complete; results.json says why."""


def method_apps(
    config: RunConfig, out_dir: Path, progress: bool = True, resume: bool = False
) -> tuple[ServerApp, ClientApp]:
    """The ServerApp and ClientApp of `config`'s method, with the ledger check if the config asks for it."""
    method = get_method(config.method)
    watch = (lambda: LedgerCheck(config, method)) if config.privacy.audit.ledger else None
    return build_apps(config, method, out_dir, progress, resume, traffic_watch=watch)


def local_federation(progress: bool = True) -> FederationRunner:
    """The federation on `federation.engine` (in this process, or Flower's simulation runtime)."""

    def run(config: RunConfig, out_dir: Path, resume: bool) -> None:
        run_federation(config, out_dir, resume, method_apps, FLOWER_APP, progress)

    return run


def run_experiment(
    config: RunConfig,
    out_dir: Path,
    progress: bool = True,
    resume: bool = False,
    federation: FederationRunner | None = None,
) -> dict[str, Any]:
    """Run `config`, write `out_dir/results.json` and `out_dir/report.md`, and return the results.

    `federation` runs the federation (default: `local_federation`). With `resume`, continue the
    interrupted run in `out_dir` after its last complete round; the config must be the one that run used.
    A fresh run refuses a folder holding another run's outputs (`blindtune.run_folder.clear_run_folder`
    empties it).
    """
    check_model_fits(config)
    prepare_run_folder(out_dir, config, resume)
    started = time.perf_counter()
    federation_file = out_dir / FEDERATION_RESULT
    federation_file.unlink(missing_ok=True)
    (federation or local_federation(progress))(config, out_dir, resume)
    if not federation_file.is_file():
        raise RunFailedError(f"the federation ended without writing {federation_file}")
    record = FederationRecord.read(federation_file)
    if record.status != "completed" or record.result is None:
        raise RunFailedError(f"the federation failed: {record.error or 'unknown error'}")
    result = record.result
    federation_seconds = time.perf_counter() - started

    method = get_method(config.method)
    inputs = BaselineInputs(
        config=config,
        task=config.load_task(),
        client_examples=client_partitions(config),
        progress=progress,
    )
    metrics: dict[str, float] = dict(result.metrics)
    placement = config.placement()
    references: dict[str, dict[str, Any]] = {}
    wanted_rows = [
        (name, compute)
        for name, wanted, compute in (
            ("centralized", config.baselines.centralized, method.centralized),
            ("local_only", config.baselines.local_only, method.local_only),
        )
        if wanted
    ]
    fingerprint = llm_fingerprint(config) if wanted_rows else ""
    with placed(placement):  # the reference rows compute where the federation did
        for name, compute in wanted_rows:
            row = cached_reference(
                name, config, functools.partial(compute, inputs), fingerprint, config.baselines.cache
            )
            metrics[name] = row.value
            references[name] = {"from_cache": row.from_cache, "seconds": row.seconds}

    cost = dict(record.cost)
    train_seconds = sum(float(row.get("train_seconds", 0.0)) for row in result.clients)
    train_tokens = sum(float(row.get("train_tokens", 0.0)) for row in result.clients)
    cost["wall_seconds"] = time.perf_counter() - started
    cost["federation_wall_seconds"] = federation_seconds
    cost["train_tokens_per_second"] = train_tokens / train_seconds if train_seconds else 0.0
    results = {
        "method": config.method,
        "model": config.model,
        "task": config.task,
        # What the metrics' figures are: accuracy, or the test responses' mean token NLL (instruction data).
        "metric": "response_nll" if inputs.task.kind is TaskKind.INSTRUCTION else "accuracy",
        "num_clients": config.federation.num_clients,
        "rounds": config.federation.rounds,
        "metrics": metrics,
        "cost": cost,
        "failures": record.failures,
        "history": result.history,
        "clients": result.clients,
        "details": result.details,
        "reference_rows": references,
        "config": config.to_dict(),
    }
    # What the privacy protections spent, the ledger check, and the audits the config asks for.
    with placed(placement):
        results["privacy"] = run_audits(config, out_dir, results, ServerFigures.of(record), progress=progress)
    (out_dir / RESULTS).write_text(json.dumps(results, indent=2))
    write_report([results], out_dir, title=f"blindtune {config.method} on {config.task}")
    add_privacy_section(out_dir / "report.md", [results])
    return results


# ---- a loopback deployment ------------------------------------------------------------------------

# The Flower App a deployment's SuperLink and SuperNodes load: each process rebuilds `method_apps`.
_deployed = DeployedApps(config_class, method_apps)
server_app = _deployed.server_app
client_app = _deployed.client_app
FLOWER_APP = AppComponents(serverapp=f"{__name__}:server_app", clientapp=f"{__name__}:client_app")


def launch(
    config: RunConfig,
    out_dir: Path,
    num_clients: int | None = None,
    tls: TlsFiles | None = None,
    *,
    options: DeploymentOptions | None = None,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the experiment `config` describes on a loopback deployment of `num_clients` SuperNodes
    (default: federation.num_clients): a SuperLink and the SuperNodes as processes.

    Writes what `run_experiment` writes (results.json, report.md, federation.json, checkpoints) plus
    `logs/` with every process's output, and returns the results.
    """
    options = dataclasses.replace(options or DeploymentOptions(), tls=tls or (options.tls if options else None))
    if num_clients is not None:
        config = dataclasses.replace(config, federation=dataclasses.replace(config.federation, num_clients=num_clients))

    def deployed(config: RunConfig, out_dir: Path, resume: bool) -> None:
        run_deployment(config, out_dir, FLOWER_APP, options, resume)

    return run_experiment(config, out_dir, progress, resume, federation=deployed)
