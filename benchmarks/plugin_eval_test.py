"""Re-scoring a finished run's plug-in on a tiny model: the same examples give the run's own figure."""

from __future__ import annotations

import pytest

from benchmarks.plugin_eval import compare_in_pairs, markdown, paired_difference, rescore


@pytest.mark.parametrize("adapter", [{"kind": "lora", "lora_rank": 2}, {"kind": "soft_prompt", "prompt_length": 2}])
def test_rescoring_the_runs_own_examples_reproduces_its_plugin(adapter, finished_offsite_run):
    offsite = {"adapter_layers_per_side": 1, "middle_keep_every": 2, "adapter": adapter}
    _, run_dir, results = finished_offsite_run(offsite)
    row = rescore(run_dir, limit=12)
    assert row["plugin"] == results["metrics"]["plugin"] == row["run_plugin"]
    assert row["llm_zero_shot"] == results["metrics"]["llm_zero_shot"]
    assert row["examples"] == 12 and 0 <= row["plugin_95"] <= 0.5
    assert len(row["correct"]) == 12 and sum(row["correct"]) / 12 == row["plugin"]
    assert row["plugin_minus_llm"]["difference"] == pytest.approx(row["plugin"] - row["llm_zero_shot"])
    again = rescore(run_dir, limit=12)
    compare_in_pairs([row, again])
    assert "against" not in row and again["against"] == row["run"]
    assert again["plugin_minus_against"] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    assert "| run |" in markdown([row, again]) and "Paired differences" in markdown([row, again])


def test_a_paired_difference_is_the_mean_gap_with_an_interval_that_excludes_zero_when_one_side_wins():
    worse = [True] * 50 + [False] * 50
    better = [True] * 62 + [False] * 38  # right on 12 examples the other gets wrong, wrong on none it gets right
    difference = paired_difference(better, worse)
    assert difference["difference"] == pytest.approx(0.12)
    low, high = difference["ci95"]
    assert 0 < low < 0.12 < high
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(better, worse[:10])
