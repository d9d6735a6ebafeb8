"""The runner: reference rows beside a federation that Flower's simulation runtime runs elsewhere."""

import dataclasses
import threading
from pathlib import Path

from blindtune import runner
from blindtune.config import RunConfig
from blindtune.conftest import tiny_run_config
from blindtune.federation.engine import Engine
from blindtune.methods.base import BaselineInputs
from blindtune.reference_rows import ReferenceRow


def test_reference_rows_do_not_wait_for_a_simulated_federation(tiny_model_dir, tmp_path, monkeypatch):
    config = tiny_run_config(
        "offsite", tiny_model_dir, {"federation": {"engine": "simulation"}, "baselines": {"cache": False}}
    )
    rows_done = threading.Event()
    compute_rows, federation = runner.reference_rows, runner.local_federation

    def watched(inputs: BaselineInputs) -> dict[str, ReferenceRow]:
        rows = compute_rows(inputs)
        rows_done.set()
        return rows

    def simulated(progress: bool = True, server_threads: int | None = None) -> runner.FederationRunner:
        assert server_threads == 1  # the server's process leaves the other cores to the rows and the clients

        def run(run_config: RunConfig, out_dir: Path, resume: bool) -> None:
            # Flower's processes would be training now; the rows are computed meanwhile, not after.
            assert rows_done.wait(timeout=300), "the reference rows waited for the federation"
            in_process = dataclasses.replace(run_config.federation, engine=Engine.INPROCESS)
            federation(progress=False)(dataclasses.replace(run_config, federation=in_process), out_dir, resume)

        return run

    monkeypatch.setattr(runner, "reference_rows", watched)
    monkeypatch.setattr(runner, "local_federation", simulated)
    results = runner.run_experiment(config, tmp_path, progress=False)
    assert set(results["reference_rows"]) == {"centralized", "local_only"}
    assert 0 <= results["metrics"]["centralized"] <= 1 and 0 <= results["metrics"]["local_only"] <= 1
