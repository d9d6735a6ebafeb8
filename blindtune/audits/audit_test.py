"""Privacy end to end on a tiny model: a DP run with its audits, re-auditing, and refusing to run."""

import json

import pytest
from torch import nn
from typer.testing import CliRunner

from blindtune.audits.audit import mia_member_ids, trained_members
from blindtune.cli import app
from blindtune.conftest import tiny_run_config
from blindtune.federation.rounds import TooFewClientsError
from blindtune.federation.strategies import FedAvg
from blindtune.runner import run_experiment

DP_RUN = {
    "baselines": {"centralized": False, "local_only": False},
    "privacy": {
        "dp": {"enabled": True, "target_epsilon": 8.0},
        "audit": {
            "membership_inference": True,
            "mia_examples": 20,
            "misuse": True,
            "perplexity_examples": 6,
            "limit_client_examples": 16,
        },
    },
}


@pytest.fixture(scope="module")
def dp_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp-run")
    return out, run_experiment(tiny_run_config("offsite", tiny_model_dir, DP_RUN), out, progress=False)


def test_a_dp_run_reports_its_epsilon_and_audits_next_to_utility(dp_run, tiny_model_dir):
    out, results = dp_run
    dp = results["privacy"]["dp"]
    assert dp["enabled"] and 0 < dp["epsilon"] <= 8.0 * 1.01
    assert dp["delta"] == pytest.approx(1e-5)  # min(1e-5, 1/(10 N)), N = the client's 16 examples
    assert dp["epsilon_by_round"]["1"] < dp["epsilon_by_round"]["2"] == pytest.approx(dp["epsilon"])
    assert len(dp["epsilon_per_client"]) == 2
    assert all(row["dp_epsilon"] > 0 for row in results["clients"])
    assert [row["dp_epsilon"] for row in results["history"]] == list(dp["epsilon_by_round"].values())

    mia = results["privacy"]["membership_inference"]
    # Members are what the clients trained on (2 rounds x 2 Poisson batches of ~4 from 16), not whole partitions.
    trained = {(p, i) for p in (0, 1) for i in trained_members(out, p)}
    assert 0 < len(trained) < 32
    member_ids = mia_member_ids(tiny_run_config("offsite", tiny_model_dir, DP_RUN), out, 1000)
    assert set(member_ids) <= trained and len(member_ids) == min(20, len(trained))
    assert mia["members"] == mia["nonmembers"] == len(member_ids)
    assert mia["loss"]["auc_95ci"][0] <= mia["loss"]["auc"] <= mia["loss"]["auc_95ci"][1]
    pairs = len(member_ids) ** 2
    for attack in ("loss", "loss_ratio"):  # the share of the (member, non-member) pairs ranked right
        assert mia[attack]["auc"] * pairs == pytest.approx(round(mia[attack]["auc"] * pairs))
        assert 0 <= mia[attack]["tpr_at_1pct_fpr"] <= 1
    # the attacked model is the LLM with the final adapter plugged in, not the LLM itself
    assert mia["mean_loss_members"] != pytest.approx(mia["mean_reference_loss_members"])
    misuse = results["privacy"]["misuse"]
    assert misuse["artefact_adapted_accuracy"] * 12 == pytest.approx(round(misuse["artefact_adapted_accuracy"] * 12))
    assert misuse["artefact_perplexity"] > 1
    assert misuse["artefact_adapted_perplexity"] != pytest.approx(misuse["artefact_perplexity"])  # adapter applied
    assert misuse["artefact_parameters"] < misuse["llm_parameters"]
    assert results["privacy"]["ledger"]["passed"] and results["privacy"]["ledger"]["replies_checked"] == 6

    saved = json.loads((out / "results.json").read_text())
    assert saved["privacy"]["dp"]["epsilon"] == dp["epsilon"]
    report = (out / "report.md").read_text()
    assert "## Privacy and utility" in report and f"{dp['epsilon']:.3g}" in report
    assert report.index("## Privacy and utility") < report.index("## Rounds")


def test_the_audit_command_reaudits_a_finished_run_and_writes_a_table(dp_run, tmp_path):
    out, results = dp_run
    table = tmp_path / "privacy.md"
    outcome = CliRunner().invoke(app, ["audit", str(out), "--no-misuse", "--table", str(table)])
    assert outcome.exit_code == 0, outcome.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["privacy"]["membership_inference"]["loss"] == results["privacy"]["membership_inference"]["loss"]
    assert saved["privacy"]["misuse"] == results["privacy"]["misuse"]  # kept, not re-run
    assert saved["privacy"]["dp"] == results["privacy"]["dp"]
    assert "MIA AUC loss" in table.read_text()


def test_a_dp_run_refuses_to_start_when_opacus_cannot_make_the_model_private(tiny_model_dir, tmp_path, monkeypatch):
    original = FedAvg.prepare_client

    def with_batch_norm(self, model, *args, **kwargs):  # a method whose trainable part Opacus cannot handle
        adapted = original(self, model, *args, **kwargs)
        adapted.model.add_module("batch_norm", nn.BatchNorm1d(4))
        return adapted

    monkeypatch.setattr(FedAvg, "prepare_client", with_batch_norm)
    config = tiny_run_config("offsite", tiny_model_dir, DP_RUN)
    with pytest.raises(TooFewClientsError, match="Opacus cannot make this model private"):
        run_experiment(config, tmp_path, progress=False)
    federation = json.loads((tmp_path / "federation.json").read_text())
    assert federation["status"] == "failed"
    assert "adapter" not in federation["cost"]["bytes_by_kind"]["to_server"]  # no update ever left a client
    assert not (tmp_path / "checkpoints" / "round-0001").exists()
    assert not list((tmp_path / "clients").glob("*/privacy_accountant.json"))
