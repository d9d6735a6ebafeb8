import json
import math

import pytest

from benchmarks.fedcot_sweep import finished_run, markdown_table, parse_epsilons, plot, sweep_row
from blindtune.conftest import tiny_run_config


def test_sweep_table_and_plot(tmp_path):
    assert parse_epsilons("1, 3,10,inf") == [1.0, 3.0, 10.0, math.inf]
    for bad in ("", "1,x", "-1"):
        with pytest.raises(ValueError, match="epsilons"):
            parse_epsilons(bad)
    rows = [
        {"epsilon": name, "accuracy": acc, "epsilon_per_token": eps, "epsilon_per_prompt": prompt,
         "epsilon_per_record": record, "recovery_rate": rate, "recovery_rate_top_k": rate, "rationales_kept": 9,
         "ledger_passed": rate < 1, "lm_recovery_rate": attacked}
        for name, acc, eps, prompt, record, rate, attacked in (
            ("1", 0.2, 1.0, 20.0, 28.0, 0.0, 0.01), ("inf", 0.5, None, None, None, 1.0, 1.0)
        )
    ]  # fmt: skip
    table = {"config": "c.yaml", "references": {"label_only": 0.3}, "rows": rows}
    text = markdown_table(table)
    # The per-record epsilon leads each row; the per-token one is a detail further right.
    assert "| 28.000 | 20.000 | 0.200 | 1 | 1.000 |" in text and "label_only 0.300" in text
    assert "| inf | inf | 0.500 | inf | inf | 1.000 | 1.000 |" in text
    assert "| 0.000 | 0.010 |" in text  # the real attacker's recovery beside the unchanged-token rate
    rows[0]["lm_recovery_rate"] = None  # not attacked: said so, not shown as an infinite epsilon
    assert "| 0.000 | none |" in markdown_table(table)
    plot(table, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_sweep_reuses_a_finished_run_of_the_same_config_only(tmp_path):
    tiny_model_dir = tmp_path / "model"  # a config names the model; nothing here loads it
    config = tiny_run_config("fedcot", tiny_model_dir, {})
    assert finished_run(config, tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert finished_run(config, tmp_path) is None  # no results: the run did not finish
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"plugin": 0.5}}))
    assert finished_run(config, tmp_path) == {"metrics": {"plugin": 0.5}}
    other = tiny_run_config("fedcot", tiny_model_dir, {"seed": 1})
    assert finished_run(other, tmp_path) is None
    elsewhere = tiny_run_config("fedcot", tiny_model_dir, {"federation": {"engine": "simulation"}})
    assert finished_run(elsewhere, tmp_path) == {"metrics": {"plugin": 0.5}}  # same clients, other engine


def test_a_sweep_row_reads_the_methods_privacy_figures():
    results = {
        "metrics": {"plugin": 0.4},
        "details": {"rationales": {"kept": 7}},
        "privacy": {"epsilon_per_token": 2.0, "recovery_rate_top5": 0.1, "ledger": {"passed": True}},
    }
    row = sweep_row(3.0, results)
    assert row["epsilon"] == "3" and row["accuracy"] == 0.4 and row["epsilon_per_token"] == 2.0
    assert row["recovery_rate_top_k"] == 0.1 and row["rationales_kept"] == 7 and row["ledger_passed"] is True
    assert row["lm_recovery_rate"] is None  # until the attack runs
    assert sweep_row(math.inf, results)["lm_recovery_rate"] == 1.0  # at inf the prompt is sent as it is
