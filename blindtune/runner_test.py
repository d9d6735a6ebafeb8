"""The runner: reference rows beside a federation that runs in other processes."""

import threading
from pathlib import Path

from blindtune import runner
from blindtune.config import RunConfig
from blindtune.conftest import tiny_run_config
from blindtune.methods.base import BaselineInputs
from blindtune.reference_rows import ReferenceRow


def test_reference_rows_do_not_wait_for_a_federation_that_runs_elsewhere(tiny_model_dir, tmp_path, monkeypatch):
    config = tiny_run_config("offsite", tiny_model_dir, {"baselines": {"cache": False}})
    rows_done = threading.Event()
    compute_rows = runner.reference_rows

    def watched(inputs: BaselineInputs) -> dict[str, ReferenceRow]:
        rows = compute_rows(inputs)
        rows_done.set()
        return rows

    monkeypatch.setattr(runner, "reference_rows", watched)

    def federation_elsewhere(run_config: RunConfig, out_dir: Path, resume: bool) -> None:
        # A deployment's processes would be training now; the rows are computed meanwhile, not after.
        assert rows_done.wait(timeout=300), "the reference rows waited for the federation"
        runner.local_federation(progress=False)(run_config, out_dir, resume)

    results = runner.run_experiment(config, tmp_path, progress=False, federation=federation_elsewhere)
    assert set(results["reference_rows"]) == {"centralized", "local_only"}
    assert 0 <= results["metrics"]["centralized"] <= 1 and 0 <= results["metrics"]["local_only"] <= 1
