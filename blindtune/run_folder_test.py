"""The run folder guard: stale outputs, --overwrite, resume with other settings, damaged checkpoints."""

import json
import os

import pytest
import torch

from blindtune.conftest import tiny_run_config
from blindtune.federation.checkpoint import CONFIG_HASH, save_checkpoint
from blindtune.run_folder import RunFolderError, check_out_dir, clear_run_folder, prepare_run_folder


def config(tmp_path, **train):
    return tiny_run_config("offsite", tmp_path / "model", {"train": train} if train else None)


def finished_run(out, run_config):
    prepare_run_folder(out, run_config, resume=False)
    save_checkpoint(out / "checkpoints", 1, {"w": torch.zeros(2)}, {CONFIG_HASH: run_config.content_hash()})
    (out / "results.json").write_text("{}")


def test_a_fresh_run_refuses_another_runs_folder_and_overwrite_clears_it(tmp_path):
    out = tmp_path / "run"
    finished_run(out, config(tmp_path))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"results.json, checkpoints.*--resume.*--overwrite"):
        prepare_run_folder(out, config(tmp_path, learning_rate=0.1), resume=False)
    assert "config.json" in clear_run_folder(out)
    prepare_run_folder(out, config(tmp_path, learning_rate=0.1), resume=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]  # the user's file stays


def test_resume_names_the_settings_that_differ(tmp_path):
    out = tmp_path / "run"
    finished_run(out, config(tmp_path))
    with pytest.raises(RunFolderError, match=r"train.learning_rate: 0.0003 -> 0.1; train.steps: 2 -> 5"):
        prepare_run_folder(out, config(tmp_path, learning_rate=0.1, steps=5), resume=True)
    other_engine = tiny_run_config("offsite", tmp_path / "model", {"federation": {"engine": "simulation"}})
    prepare_run_folder(out, other_engine, resume=True)  # the engine does not change results


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    out = tmp_path / "run"
    finished_run(out, config(tmp_path))
    save_checkpoint(out / "checkpoints", 2, {"w": torch.zeros(2)}, {CONFIG_HASH: "0123456789abcdef"})
    with pytest.raises(RunFolderError, match=r"checkpoints was written by another config \(hash 0123456789abcdef"):
        prepare_run_folder(out, config(tmp_path), resume=True)


def test_resume_refuses_a_truncated_checkpoint_in_one_line(tmp_path):
    out = tmp_path / "run"
    finished_run(out, config(tmp_path))
    state = out / "checkpoints" / "round-0001" / "adapter.safetensors"
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(RunFolderError, match=r"round-0001 is damaged.*--overwrite") as error:
        prepare_run_folder(out, config(tmp_path), resume=True)
    assert "\n" not in str(error.value)


def test_resume_needs_a_run_to_resume(tmp_path):
    with pytest.raises(RunFolderError, match="nothing to resume"):
        prepare_run_folder(tmp_path / "empty", config(tmp_path), resume=True)


def test_an_out_folder_that_is_a_file_or_under_one_is_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        check_out_dir(a_file)
    with pytest.raises(RunFolderError, match=f"{a_file} is a file"):
        check_out_dir(a_file / "run")
    check_out_dir(tmp_path / "new" / "deeper")  # not there yet: fine
    assert not (tmp_path / "new").exists()  # and nothing made by checking


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(RunFolderError, match="not writable"):
        check_out_dir(locked / "run")


def test_config_json_of_a_fresh_run_is_the_given_config(tmp_path):
    out = tmp_path / "run"
    prepare_run_folder(out, config(tmp_path), resume=False)
    assert json.loads((out / "config.json").read_text()) == config(tmp_path).to_dict()
