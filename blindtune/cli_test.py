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
