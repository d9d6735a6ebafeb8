"""FedCoT, client side.

1. Hand-out (`query.setup` with the SLM): store the SLM, privatise the first `prompts_per_client`
   prompts token by token with the exponential mechanism in the SLM's input-embedding space, and
   reply with the privatised texts only (plus the budget spent and the recovery-attack rate, numbers).
2. Training plan (`query.setup` without an SLM): store the server's rationales (one per privatised
   prompt) and the objective to train (labels and rationales, or labels only).
3. Each round (`train`): LoRA on the SLM from the global state, L = L_label + lambda * L_rationale on
   the client's own raw prompts; reply with the LoRA state.

What leaves a client: its privatised prompts (once; template lines unchanged, they are public) and
its LoRA state every round. That LoRA is trained on the raw prompts and labels: without DP it crosses
unprotected, and no epsilon covers it (the run's record-level epsilon is then infinite). With
`privacy.dp` the client trains it by DP-SGD (`train_private`) with one row per record (the label, and
the record's rationale after it, so a record is one clipped gradient), and the run's per-record
epsilon is the prompt's text epsilon plus the DP-SGD epsilon (basic composition).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.encoding import as_causal_lm
from blindtune.federation.adapter_rounds import PROXIMAL_MU, ROUND, SEED, record_trained, store_artefact
from blindtune.federation.records import MessageKind, RecordKey, arrays, number, tensors_to_record
from blindtune.federation.strategies import configured_strategy
from blindtune.methods.base import ClientRun
from blindtune.methods.fedcot.config import FedCoTConfig, RationaleSource
from blindtune.methods.fedcot.rationales import agrees_with_gold, label_example, oracle_rationale, rationale_examples
from blindtune.models.adapters import AdaptedModel
from blindtune.models.artefact import load_artefact
from blindtune.models.surgery import num_decoder_layers
from blindtune.privacy.context import ClientPrivacy, active_client_privacy
from blindtune.privacy.dp import train_private
from blindtune.privacy.text_privatisation import (
    ExponentialMechanism,
    privatise_prompts,
    recovery_attack,
    template_lines,
    vocabulary_candidates,
)
from blindtune.training import TrainConfig, train
from blindtune.training.loop import AuxiliaryTask

TEXTS = "texts"  # the list of strings in a PRIVATISED_PROMPTS / RATIONALES record
OBJECTIVE = "objective"  # instruction: what the next rounds train
LABEL_AND_RATIONALE = "label_and_rationale"
LABEL_ONLY = "label_only"
_PLAN_FILE = "fedcot_plan.json"
INFINITE = -1.0  # how an infinite epsilon travels in a MetricRecord


def answer_client(kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
    if kind is MessageKind.TRAIN:
        return train_slm(content, run)
    if RecordKey.ARTEFACT in content.array_records:
        return privatise(content, run)
    return store_plan(content, run)


def privatised_examples(run: ClientRun) -> list[Example]:
    """The examples whose prompts the client privatises (and gets rationales for)."""
    return run.examples[: run.config.method_config.prompts_per_client]


def privatise(content: RecordDict, run: ClientRun) -> RecordDict:
    """Store the SLM; privatise prompts in its embedding space; reply with the privatised texts."""
    store_artefact(content, run.workdir)
    method: FedCoTConfig = run.config.method_config
    if method.rationale_source is RationaleSource.ORACLE:  # the client's own gold rationales: nothing to send
        return RecordDict({RecordKey.METRICS: MetricRecord({"num_prompts": 0})})
    slm = load_artefact(run.workdir)
    table = input_embeddings(slm.model)
    mechanism = ExponentialMechanism(table, vocabulary_candidates(slm.tokenizer, table.shape[0]))
    config = method.privatisation
    template = template_lines([example.prompt for example in run.examples], config.template_share)
    private = privatise_prompts(
        [example.prompt for example in privatised_examples(run)],
        slm.tokenizer,
        mechanism,
        config,
        template,
        seed=run.config.seed * 1_000_003 + run.partition_id,
    )
    attack = recovery_attack(mechanism, private, config.attack_top_k)
    per_token = [e for p in private for e in p.epsilons]
    per_prompt = [p.epsilon for p in private]
    return RecordDict(
        {
            RecordKey.PRIVATISED_PROMPTS: ConfigRecord({TEXTS: [p.text for p in private]}),
            RecordKey.METRICS: MetricRecord(
                {
                    "num_prompts": len(private),
                    "private_tokens": len(per_token),
                    "epsilon_per_token_max": _finite_or_flag(max(per_token, default=0.0)),
                    "epsilon_per_prompt_max": _finite_or_flag(max(per_prompt, default=0.0)),
                    "epsilon_per_prompt_sum": _finite_or_flag(math.fsum(per_prompt)),
                    **{key: value for key, value in attack.items() if key != "tokens"},
                }
            ),
        }
    )


def input_embeddings(model: nn.Module) -> torch.Tensor:
    """The SLM's input-embedding table: the space the client privatises in."""
    table = as_causal_lm(model).get_input_embeddings().weight
    assert isinstance(table, torch.Tensor)
    return table


def texts(content: RecordDict, key: RecordKey) -> list[str]:
    """The list of strings of a text record (a clear error when absent or not a list of strings)."""
    record = content.config_records.get(key)
    values = None if record is None else record.get(TEXTS)
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise ValueError(f"message record {key!r} has no list of strings {TEXTS!r}")
    return [str(value) for value in values]


def _finite_or_flag(value: float) -> float:
    return value if math.isfinite(value) else INFINITE


def store_plan(content: RecordDict, run: ClientRun) -> RecordDict:
    """Keep the objective of the next rounds and the server's rationales; report how many are usable."""
    instructions = content.config_records.get(RecordKey.INSTRUCTIONS)
    objective = None if instructions is None else instructions.get(OBJECTIVE)
    if objective not in (LABEL_AND_RATIONALE, LABEL_ONLY):
        raise ValueError(f"fedcot plan message has no valid {OBJECTIVE!r} instruction (got {objective!r})")
    rationales = texts(content, RecordKey.RATIONALES) if RecordKey.RATIONALES in content.config_records else None
    if rationales is not None and len(rationales) != len(privatised_examples(run)):
        raise ValueError(f"{len(rationales)} rationales for {len(privatised_examples(run))} privatised prompts")
    (run.workdir / _PLAN_FILE).write_text(json.dumps({OBJECTIVE: objective, "rationales": rationales}))
    kept = len(_rationale_examples(run, rationales)) if objective == LABEL_AND_RATIONALE else 0
    return RecordDict(
        {RecordKey.METRICS: MetricRecord({"rationales_received": len(rationales or []), "rationales_kept": kept})}
    )


def _rationale_examples(run: ClientRun, rationales: list[str] | None) -> list[Example]:
    method: FedCoTConfig = run.config.method_config
    examples = privatised_examples(run)
    if method.rationale_source is RationaleSource.ORACLE:
        rationales = [oracle_rationale(example) for example in examples]
    if rationales is None:
        raise ValueError("no rationales stored: the server sent none and rationale_source is not oracle")
    return rationale_examples(examples, rationales, method)[0]


def _load_plan(workdir: Path) -> dict[str, object]:
    path = workdir / _PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training plan (the server must send rationales before training)")
    return json.loads(path.read_text())


def train_slm(content: RecordDict, run: ClientRun) -> RecordDict:
    """One round: LoRA on the SLM, labels plus (weighted) rationales, from the global LoRA state."""
    method: FedCoTConfig = run.config.method_config
    federation = run.config.federation
    plan = _load_plan(run.workdir)
    slm = load_artefact(run.workdir)
    seed = int(number(content, RecordKey.INSTRUCTIONS, SEED))
    round_number = int(number(content, RecordKey.INSTRUCTIONS, ROUND))
    strategy = configured_strategy(federation, method.adapter)
    every_layer = {i: i for i in range(num_decoder_layers(slm.model))}
    adapted = strategy.prepare_client(
        slm.model, arrays(content, RecordKey.ADAPTER), every_layer, federation.client_rank(run.partition_id), seed
    )
    train_config = dataclasses.replace(
        run.config.train,
        batch_size=federation.client_batch_size(run.partition_id, run.config.train.batch_size),
        proximal_mu=number(content, RecordKey.INSTRUCTIONS, PROXIMAL_MU),
    )
    labels = [label_example(example, method, slm.tokenizer.eos_token or "") for example in run.examples]
    privacy = active_client_privacy()
    if privacy is not None and privacy.config.dp.enabled:
        return _train_slm_private(run, plan, adapted, slm.tokenizer, labels, train_config, privacy, seed, round_number)
    auxiliary = None
    if plan[OBJECTIVE] == LABEL_AND_RATIONALE and method.rationale_weight > 0:
        rationales = _rationale_examples(run, plan["rationales"])  # type: ignore[arg-type]
        auxiliary = AuxiliaryTask(rationales, method.rationale_weight) if rationales else None
    stats = train(
        adapted.model,
        slm.tokenizer,
        labels,
        train_config,
        seed=seed * 1_000_003 + round_number * 1009 + run.partition_id,
        progress=False,
        desc=f"client {run.partition_id} round {round_number}",
        auxiliary=auxiliary,
    )
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num_examples": len(labels),
        "examples_seen": stats.examples_seen,
        "train_loss": stats.mean_loss,
        "train_seconds": stats.seconds,
        "train_tokens": stats.tokens_seen,
        "rationale_examples": len(auxiliary.examples) if auxiliary else 0,
    }
    if stats.auxiliary_mean_loss is not None:
        metrics["rationale_loss"] = stats.auxiliary_mean_loss
    record_trained(run.workdir, stats.trained_indices)
    return RecordDict({RecordKey.ADAPTER: tensors_to_record(adapted.state()), RecordKey.METRICS: MetricRecord(metrics)})


def private_rows(run: ClientRun, plan: dict[str, object], labels: list[Example]) -> list[Example]:
    """One training row per record for DP-SGD: the label, followed by the record's rationale where it
    has a usable one (so a record's influence is one clipped per-example gradient)."""
    method: FedCoTConfig = run.config.method_config
    if plan[OBJECTIVE] != LABEL_AND_RATIONALE or method.rationale_weight == 0:
        return labels
    examples = privatised_examples(run)
    rationales = plan["rationales"]
    if method.rationale_source is RationaleSource.ORACLE:
        rationales = [oracle_rationale(example) for example in examples]
    assert isinstance(rationales, list)
    rows = list(labels)
    for index, (example, rationale) in enumerate(zip(examples, rationales, strict=True)):
        if rationale and (not method.filter_rationales or agrees_with_gold(rationale, example)):
            rows[index] = dataclasses.replace(labels[index], target=f"{labels[index].target}\n{rationale}")
    return rows


def _train_slm_private(
    run: ClientRun,
    plan: dict[str, object],
    adapted: AdaptedModel,
    tokenizer: PreTrainedTokenizerBase,
    labels: list[Example],
    train_config: TrainConfig,
    privacy: ClientPrivacy,
    seed: int,
    round_number: int,
) -> RecordDict:
    stats, spent = train_private(
        adapted.model,
        tokenizer,
        private_rows(run, plan, labels),
        train_config,
        privacy.config.dp,
        run.workdir,
        seed=seed * 1_000_003 + round_number * 1009 + run.partition_id,
        round_number=round_number,
        planned_rounds=privacy.planned_rounds,
        progress=False,
        desc=f"client {run.partition_id} round {round_number} (DP)",
    )
    record_trained(run.workdir, stats.trained_indices)
    # No loss or counts of the private batches: only what went through the mechanism, and the budget.
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num_examples": len(labels),
        "train_seconds": stats.seconds,
        **spent.metrics(),
    }
    return RecordDict({RecordKey.ADAPTER: tensors_to_record(adapted.state()), RecordKey.METRICS: MetricRecord(metrics)})
