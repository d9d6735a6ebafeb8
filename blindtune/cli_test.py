import json

import pytest
from typer.testing import CliRunner

from blindtune.cli import app

runner = CliRunner()


def test_eval_writes_eval_json_for_any_model_directory(tiny_model_dir, tmp_path):
    arguments = ["eval", "--task", "wordnet-supersense", "--model", str(tiny_model_dir), "--limit", "8"]
    result = runner.invoke(app, [*arguments, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["num_examples"] == 8 and saved["accuracy"] * 8 == pytest.approx(round(saved["accuracy"] * 8))


def test_eval_on_a_users_jsonl_file(tiny_model_dir, tmp_path):
    rows = [{"text": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(30)]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = runner.invoke(app, ["eval", "--task", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["num_examples"] == 3


def test_user_errors_are_reported_without_a_traceback(tmp_path):
    import subprocess
    import sys

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "choices": ["x", "y"], "label": 0}\n{"text": "b", "choices": ["x"]}\n')
    for args, expected in [
        (["eval", "--model", str(tmp_path / "nowhere")], "neither"),
        (["eval", "--task", str(broken)], "broken.jsonl:2"),
        (["eval", "--task", "no-such-task"], "unknown task"),
    ]:
        done = subprocess.run([sys.executable, "-m", "blindtune.cli", *args], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert expected in done.stdout and "Traceback" not in done.stderr


def test_run_applies_set_overrides(monkeypatch, tmp_path):
    import blindtune.report
    import blindtune.runner

    seen = []
    monkeypatch.setattr(blindtune.runner, "run_experiment", lambda config, out, resume: seen.append(config) or {})
    monkeypatch.setattr(blindtune.report, "rich_table", lambda results: "")
    quick = "offsite_wordnet_3clients_quick.yaml"  # a packaged config's name is enough
    settings = ["--set", "train.steps=40", "--set", "federation.rounds=6", "--set", "offsite.adapter.lora_rank=4"]
    result = runner.invoke(app, ["run", quick, "--out", str(tmp_path), *settings])
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert (config.train.steps, config.federation.rounds, config.method_config.adapter.lora_rank) == (40, 6, 4)
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--set", "train.steps=3"])
    assert result.exit_code == 0, result.output
    assert seen[-1].train.steps == 3 and seen[-1].federation.rounds == 2


def test_bad_set_options_end_with_a_one_line_error():
    import subprocess
    import sys

    for setting, expected in [
        ("train.stepz=40", "unknown key(s) train.stepz"),
        ("train.steps=many", "train.steps: expected int, got 'many'"),
        ("train.steps", "expected KEY.PATH=VALUE"),
    ]:
        args = ["run", "offsite_wordnet_3clients_quick.yaml", "--set", setting]
        done = subprocess.run([sys.executable, "-m", "blindtune.cli", *args], capture_output=True, text=True)
        assert done.returncode == 2, done.stdout + done.stderr
        assert expected in done.stdout and len(done.stdout.strip().splitlines()) == 1, done.stdout
        assert "Traceback" not in done.stderr


# --- ordinary mistakes: one line, exit code 2, nothing half-written --------------------------------


def fails(monkeypatch, capsys, *args):
    """Run `blindtune ARGS` through the entry point; return its output, asserting exit 2 and no traceback."""
    import sys

    import pytest

    from blindtune.cli import main

    monkeypatch.setattr(sys, "argv", ["blindtune", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert exit_info.value.code == 2, text
    assert "Traceback" not in text
    return " ".join(text.split())


def write_config(path, tiny_model_dir, **changes):
    import yaml

    from blindtune.conftest import tiny_run_config

    data = tiny_run_config("offsite", tiny_model_dir).to_dict()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def test_out_that_is_a_file_or_under_one_is_refused_before_any_work(monkeypatch, capsys, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir)
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    assert "is a file" in fails(monkeypatch, capsys, "run", config, "--out", a_file)
    assert a_file.read_text() == "keep me"
    output = fails(monkeypatch, capsys, "eval", "--model", tiny_model_dir, "--out", a_file / "sub")
    assert f"{a_file} is a file" in output and "accuracy" not in output


def test_a_folder_with_another_runs_results_is_refused(monkeypatch, capsys, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    output = fails(monkeypatch, capsys, "run", config, "--out", out)
    assert "another run's results.json" in output and "--resume" in output and "--overwrite" in output
    assert (out / "results.json").read_text() == "{}" and not (out / "config.json").exists()


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("- method: offsite\n", "top level must be a mapping"),
        ("method: nosuch\n", "bad.yaml: unknown method 'nosuch'"),
        ("method: offsite\ntrain:\n  steps: -5\n", "train: steps must be >= 0, got -5"),
        ("method: offsite\neval:\n  limit: 0\n", "eval: limit must be >= 1, got 0"),
    ],
)
def test_config_mistakes_name_the_file_and_key(monkeypatch, capsys, tmp_path, yaml_text, expected):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    assert expected in fails(monkeypatch, capsys, "run", tmp_path / "bad.yaml", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bogus_engine_is_blamed_on_the_option(monkeypatch, capsys, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir)
    output = fails(monkeypatch, capsys, "run", config, "--engine", "bogus")
    assert "--engine" in output and "bogus" in output and "run.yaml" not in output


def test_too_many_adapter_layers_for_the_model(monkeypatch, capsys, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, offsite__adapter_layers_per_side=4)
    output = fails(monkeypatch, capsys, "run", config, "--out", tmp_path / "out")
    assert "offsite.adapter_layers_per_side: 4 layers per side" in output and "at most 3" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "value"), [("--limit", "-1"), ("--limit", "0"), ("--batch-size", "0")])
def test_eval_numeric_options_are_validated(monkeypatch, capsys, tiny_model_dir, option, value):
    output = fails(monkeypatch, capsys, "eval", "--model", tiny_model_dir, option, value)
    assert "must be >= 1" in output


def test_a_model_folder_without_a_tokenizer(monkeypatch, capsys, tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, model / name)
    output = fails(monkeypatch, capsys, "eval", "--model", model)
    assert f"{model} has no tokenizer" in output and "sentencepiece" not in output


def test_tls_files_that_are_not_pem(monkeypatch, capsys, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir)
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("not a certificate\n")
    tls = ["--tls-ca-cert", tmp_path / "ca.pem", "--tls-server-cert", tmp_path / "cert.pem"]
    output = fails(monkeypatch, capsys, "launch", config, *tls, "--tls-server-key", tmp_path / "key.pem")
    assert "ca.pem is not a PEM certificate" in output


def test_a_truncated_results_json_given_to_audit(monkeypatch, capsys, tmp_path):
    (tmp_path / "results.json").write_text('{"method": "offsite", "metr')
    assert "results.json:1: not valid JSON" in fails(monkeypatch, capsys, "audit", tmp_path)


def test_debug_keeps_the_traceback(monkeypatch):
    import sys

    from blindtune.cli import main
    from blindtune.data import UnknownTaskError

    monkeypatch.setattr(sys, "argv", ["blindtune", "--debug", "eval", "--task", "no-such-task"])
    with pytest.raises(UnknownTaskError):
        main()


def test_eval_on_a_task_folder_with_a_template(tiny_model_dir, tmp_path):
    rows = [{"text": f"word {i}", "choices": ["noun", "verb"], "label": i % 2} for i in range(10)]
    data = tmp_path / "mine"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    arguments = ["eval", "--task", str(data), "--model", str(tiny_model_dir), "--template", "Word: {text}\\nKind:"]
    result = runner.invoke(app, [*arguments, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["num_examples"] == 10


def test_ctrl_c_during_launch_says_how_to_resume(monkeypatch, tiny_model_dir, tmp_path):
    import blindtune.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(blindtune.runner, "launch", interrupted)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir)
    result = runner.invoke(app, ["launch", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 130
    assert f"continue with: blindtune launch {config} --out {tmp_path / 'out'} --resume" in " ".join(
        result.output.split()
    )


def test_flower_and_ray_chatter_is_kept_at_warning_unless_verbose():
    import logging

    from blindtune.cli import _setup_logging

    _setup_logging(verbose=False)
    assert not logging.getLogger("flwr").isEnabledFor(logging.INFO)
    assert not logging.getLogger("ray").isEnabledFor(logging.INFO)
    assert logging.getLogger("blindtune.progress").isEnabledFor(logging.INFO)
    _setup_logging(verbose=True)
    assert logging.getLogger("flwr").isEnabledFor(logging.DEBUG)
    _setup_logging(verbose=False)


def test_run_on_a_task_folder_with_a_template(tiny_model_dir, tmp_path):
    import yaml

    from blindtune.conftest import tiny_run_config

    data = tmp_path / "mine"
    data.mkdir()
    rows = [{"text": f"word {i}", "choices": ["noun", "verb", "adjective"], "label": i % 3} for i in range(40)]
    for split, part in (("train", rows[:30]), ("test", rows[30:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    overrides = {"task": str(data), "task_template": "Word: {text}\nKind:", "choice_prefix": " a "}
    overrides |= {"baselines": {"centralized": False, "local_only": False}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config("offsite", tiny_model_dir, overrides).to_dict()))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"] == str(data) and 0.0 <= results["metrics"]["plugin"] <= 1.0
    assert results["config"]["task_template"] == "Word: {text}\nKind:"
