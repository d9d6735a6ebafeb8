import copy
import dataclasses
import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from blindtune.audits.ledger_check import ReceivedText, TrafficAudit, check
from blindtune.conftest import tiny_run_config
from blindtune.data import Example, load_task
from blindtune.federation.records import MessageKind, RecordKey
from blindtune.methods.base import ClientRun, ServerRun
from blindtune.methods.fedcot.client import INFINITE, LABEL_AND_RATIONALE, OBJECTIVE, TEXTS, answer_client, texts
from blindtune.methods.fedcot.config import FedCoTConfig
from blindtune.methods.fedcot.rationales import (
    agrees_with_gold,
    clean_rationale,
    label_example,
    label_task,
    oracle_rationale,
    rationale_answer,
    rationale_examples,
)
from blindtune.methods.fedcot.server import (
    PRIVATISED_RECORDS,
    hand_out_content,
    privacy_summary,
    record_privacy,
    run_server,
)
from blindtune.models import tiny_model
from blindtune.models.loading import LoadedModel
from blindtune.runner import run_experiment
from blindtune.training import TrainConfig, train
from blindtune.training.loop import AuxiliaryTask

CHOICES = (" animal", " plant", " food")
SUPERSENSE = Example("Definition: a large wild cat\nCategory (one of: animal, plant, food):", " animal", CHOICES, 0)
MATH = Example("Question: 2 + 3?\nAnswer:", " 2 + 3 = 5\n#### 5", answer="5")


def test_rationales_are_cut_read_and_filtered():
    assert clean_rationale(" It is a cat, an animal.\n\nDefinition: next one") == "It is a cat, an animal."
    assert clean_rationale("Cats hunt.\nQuestion: another") == "Cats hunt."
    assert rationale_answer("Not a plant: a cat is an animal.", SUPERSENSE) == 0
    assert rationale_answer("Cats are eaten as food", SUPERSENSE) == 2
    assert rationale_answer("no option named", SUPERSENSE) is None
    assert rationale_answer("2 + 3 = 5 so #### 5", MATH) == "5"
    assert agrees_with_gold("an animal", SUPERSENSE) and not agrees_with_gold("a plant", SUPERSENSE)
    config = FedCoTConfig(filter_rationales=True)
    kept, dropped = rationale_examples([SUPERSENSE, SUPERSENSE, SUPERSENSE], ["an animal", "a plant", ""], config)
    assert dropped == 2 and kept == [Example("[rationale] " + SUPERSENSE.prompt, " an animal")]
    unfiltered, dropped = rationale_examples([SUPERSENSE, SUPERSENSE], ["an animal", "a plant"], FedCoTConfig())
    assert len(unfiltered) == 2 and dropped == 0
    with pytest.raises(ValueError, match="1 rationales for 2 examples"):
        rationale_examples([SUPERSENSE, SUPERSENSE], ["x"], config)


def test_label_outputs_and_oracle_rationales():
    config = FedCoTConfig(label_prefix="[label] ")
    assert label_example(SUPERSENSE, config) == dataclasses.replace(SUPERSENSE, prompt="[label] " + SUPERSENSE.prompt)
    assert label_example(MATH, config, "<end>").target == " #### 5<end>"
    assert oracle_rationale(MATH) == "2 + 3 = 5"
    with pytest.raises(ValueError, match="oracle"):
        oracle_rationale(SUPERSENSE)
    task = load_task("wordnet-supersense")
    assert label_task(task, config).test[0].prompt == "[label] " + task.test[0].prompt
    with pytest.raises(ValueError, match="prompt"):
        FedCoTConfig(rationale_template="no placeholder")


def test_auxiliary_objective_is_weighted_and_weight_zero_changes_nothing():
    base = tiny_model(num_layers=2, hidden_size=32)
    examples = [SUPERSENSE] * 4
    auxiliary = [Example("[rationale] " + SUPERSENSE.prompt, " a cat is an animal")] * 4
    config = TrainConfig(steps=3, batch_size=2, learning_rate=1e-2, max_length=64)

    def trained(task: AuxiliaryTask | None) -> tuple[dict[str, torch.Tensor], float | None]:
        model = copy.deepcopy(base.model)
        stats = train(model, base.tokenizer, examples, config, seed=0, progress=False, auxiliary=task)
        return model.state_dict(), stats.auxiliary_mean_loss

    plain, none_loss = trained(None)
    zero, zero_loss = trained(AuxiliaryTask(auxiliary, 0.0))
    weighted, weighted_loss = trained(AuxiliaryTask(auxiliary, 1.0))
    assert none_loss is None and zero_loss is not None and weighted_loss is not None
    assert all(torch.equal(plain[name], zero[name]) for name in plain)
    assert any(not torch.equal(plain[name], weighted[name]) for name in plain)
    with pytest.raises(ValueError, match="auxiliary"):
        AuxiliaryTask([], 1.0)
    with pytest.raises(ValueError, match="auxiliary"):
        AuxiliaryTask(auxiliary, math.nan)


def _client(tmp_path, tiny_model_dir, epsilon: float) -> tuple[ClientRun, RecordDict]:
    config = tiny_run_config(
        "fedcot", tiny_model_dir, {"fedcot": {"prompts_per_client": 5, "privatisation": {"epsilon": epsilon}}}
    )
    examples = load_task("wordnet-supersense").train[:40]
    run = ClientRun(config=config, partition_id=0, examples=examples, workdir=tmp_path)
    loaded = tiny_model(num_layers=2, hidden_size=32)
    return run, hand_out_content(LoadedModel(loaded.model, loaded.tokenizer, "slm"))


def _ledger(replies: list[RecordDict], examples: list[Example]) -> dict:
    audit = TrafficAudit(None)  # type: ignore[arg-type]  # only its inbox is used here
    for reply in replies:
        for name in reply.config_records:
            audit.texts += [ReceivedText("query.setup", name, TEXTS, text) for text in texts(reply, RecordKey(name))]
    return check(audit, [examples], PRIVATISED_RECORDS)


def test_client_sends_only_privatised_text_and_the_ledger_check_tells_them_apart(tmp_path, tiny_model_dir):
    run, setup = _client(tmp_path / "private", tiny_model_dir, epsilon=10.0)
    reply = answer_client(MessageKind.SETUP, setup, run)
    assert set(reply.config_records) == {RecordKey.PRIVATISED_PROMPTS}
    sent = texts(reply, RecordKey.PRIVATISED_PROMPTS)
    assert len(sent) == 5 and all(t.startswith("Definition:") and t.endswith("substance):") for t in sent)
    metrics = reply[RecordKey.METRICS]
    assert metrics["num_prompts"] == 5 and metrics["private_tokens"] > 10  # type: ignore[operator]
    assert math.isclose(metrics["epsilon_per_prompt_sum"], 10.0 * metrics["private_tokens"])  # type: ignore[arg-type,operator]
    verdict = _ledger([reply], run.examples)
    assert verdict["passed"] and verdict["privatised_texts_received"] == 5
    # Without privatisation the same path sends raw text, and the ledger check says so.
    raw_run, setup = _client(tmp_path / "raw", tiny_model_dir, epsilon=math.inf)
    raw = answer_client(MessageKind.SETUP, setup, raw_run)
    assert raw[RecordKey.METRICS]["epsilon_per_prompt_max"] == INFINITE  # type: ignore[index]
    assert texts(raw, RecordKey.PRIVATISED_PROMPTS) == [e.prompt for e in raw_run.examples[:5]]
    assert _ledger([raw], raw_run.examples)["raw_text_leaks"] == 5
    # The training plan must match what was privatised.
    plan = RecordDict(
        {
            RecordKey.INSTRUCTIONS: ConfigRecord({OBJECTIVE: LABEL_AND_RATIONALE}),
            RecordKey.RATIONALES: ConfigRecord({TEXTS: ["an animal"] * 4}),
        }
    )
    with pytest.raises(ValueError, match="4 rationales for 5"):
        answer_client(MessageKind.SETUP, plan, run)
    plan[RecordKey.RATIONALES] = ConfigRecord({TEXTS: ["an animal"] * 5})
    assert answer_client(MessageKind.SETUP, plan, run)[RecordKey.METRICS]["rationales_kept"] == 5  # type: ignore[index]
    with pytest.raises(ValueError, match="objective"):
        answer_client(MessageKind.SETUP, RecordDict({RecordKey.INSTRUCTIONS: ConfigRecord({})}), run)


def test_privacy_summary_weights_by_tokens_and_reports_infinity():
    def reply(tokens: int, rate: float, prompt_max: float) -> RecordDict:
        figures = {
            "num_prompts": 2, "private_tokens": tokens, "epsilon_per_token_max": 12.0,
            "epsilon_per_prompt_max": prompt_max, "epsilon_per_prompt_sum": max(2 * prompt_max, INFINITE),
            "recovery_rate": rate, "recovery_rate_top10": rate,
        }  # fmt: skip
        return RecordDict({RecordKey.METRICS: MetricRecord(figures)})

    summary = privacy_summary(FedCoTConfig(), {1: reply(10, 0.0, 50.0), 2: reply(30, 0.4, 80.0)})
    assert summary["recovery_rate"] == pytest.approx(0.3) and summary["epsilon_per_prompt"] == 80.0
    assert summary["epsilon_per_prompt_mean"] == pytest.approx(65.0) and summary["epsilon_per_token"] == 12.0
    infinite = privacy_summary(FedCoTConfig(), {1: reply(10, 1.0, INFINITE)})
    assert infinite["epsilon_per_prompt"] is None and infinite["epsilon_per_prompt_mean"] is None


def test_membership_inference_audit_is_refused(tiny_model_dir, tmp_path):
    config = tiny_run_config("fedcot", tiny_model_dir, {"privacy": {"audit": {"membership_inference": True}}})
    with pytest.raises(ValueError, match="membership_inference"):
        run_server(ServerRun(config, None, tmp_path))  # type: ignore[arg-type]  # refused before any message


def test_the_headline_epsilon_is_the_record_level_composition_of_every_channel(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLINDTUNE_CACHE", str(tmp_path / "cache"))
    fedcot = {"prompts_per_client": 6, "max_new_tokens": 6, "privatisation": {"attack_top_k": 3}}
    overrides = {
        "fedcot": {**fedcot, "label_only_baseline": False},
        "baselines": {"centralized": False, "local_only": False},
        "privacy": {"dp": {"enabled": True, "noise_multiplier": 1.0}},
    }
    results = run_experiment(tiny_run_config("fedcot", tiny_model_dir, overrides), tmp_path / "dp", progress=False)
    privacy = results["privacy"]
    parts = privacy["epsilon_per_record_parts"]
    assert parts["privatised_prompt"] == privacy["epsilon_per_prompt"] > privacy["epsilon_per_token"]
    assert parts["lora_adapter"] == pytest.approx(privacy["dp"]["epsilon"]) and privacy["dp"]["epsilon"] > 0
    assert privacy["epsilon_per_record"] == pytest.approx(privacy["epsilon_per_prompt"] + privacy["dp"]["epsilon"])
    assert privacy["ledger"]["passed"]  # no exact loss or counts left the DP clients
    assert not any("train_loss" in row for row in results["clients"])

    # Without DP the LoRA states cross unprotected: no finite per-record epsilon, whatever the text's.
    plain = record_privacy(privacy["epsilon_per_prompt"], [{"train_loss": 1.0}], dp_enabled=False)
    assert plain["epsilon_per_record"] is None and plain["epsilon_per_record_parts"]["lora_adapter"] is None
    with pytest.raises(ValueError, match="label_only_baseline"):
        overrides["fedcot"] = fedcot
        run_experiment(tiny_run_config("fedcot", tiny_model_dir, overrides), tmp_path / "refused", progress=False)
