"""Privacy audits of a finished run, and the `privacy` section of its results.json.

- `dp`, `server_dp`, `secagg`: what the run's protections spent, from the clients' accountants (each
  client reports its epsilon with every update) and the server's round loop;
- `ledger`: the ledger check (`blindtune.audits.ledger_check`), done while the run ran;
- `membership_inference`: loss and reference loss-ratio attacks on the LLM with the final adapter
  plugged in (`blindtune.audits.mia`); members are client training examples, non-members the task's
  held-out (validation and test) examples, as many as members;
- `misuse`: the artefact the server handed out (emulator, proxy) as a standalone model: its accuracy
  alone and with the final adapter, against the LLM's and the plug-in's, and its perplexity on
  held-out task text against the LLM's.

Run by the runner when the config asks for them, or later on a run directory (`blindtune audit`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid
from torch import nn

from blindtune.audits.ledger_check import TrafficAudit, check
from blindtune.audits.mia import example_losses, membership_inference
from blindtune.audits.report import add_privacy_section
from blindtune.config import RunConfig
from blindtune.data import Example
from blindtune.eval.scoring import perplexity
from blindtune.federation.adapter_rounds import LAYER_MAP_FILE, trained_ids
from blindtune.federation.apps import FederationRecord, client_partitions
from blindtune.federation.checkpoint import latest_checkpoint
from blindtune.federation.strategies import FedAvg, configured_strategy
from blindtune.methods import Method, get_method, run_config_from_dict
from blindtune.models import load_model
from blindtune.models.artefact import has_artefact, load_artefact, stored_mlp_channels
from blindtune.models.loading import LoadedModel
from blindtune.privacy.context import PrivacyNotAppliedError
from blindtune.report import ResultsError, write_report

log = logging.getLogger(__name__)

_SECTION_KEYS = ("dp", "server_dp", "secagg", "ledger", "membership_inference", "misuse")


def client_examples(config: RunConfig) -> list[list[Example]]:
    """Each client's training examples as its client app sees them (after `limit_client_examples`)."""
    limit = config.privacy.audit.limit_client_examples
    return [examples[:limit] if limit is not None else examples for examples in client_partitions(config)]


class LedgerCheck:
    """The ledger check as the federation's traffic watch: reads every reply the server receives and,
    after the run, looks in it for the clients' raw text (`blindtune.audits.ledger_check`)."""

    def __init__(self, config: RunConfig, method: Method) -> None:
        self.config = config
        self.privatised = method.privatised_text_records
        self.traffic: TrafficAudit | None = None

    def watch(self, grid: Grid) -> Grid:
        self.traffic = TrafficAudit(grid)
        return self.traffic

    def findings(self) -> dict[str, Any]:
        assert self.traffic is not None, "watch() comes first"
        # Everything the clients hold, not only what they trained on, counts as their raw text.
        return check(self.traffic, client_partitions(self.config), self.privatised, self.config.privacy.dp.enabled)


@dataclass
class ServerFigures:
    """What the run's server recorded about privacy: its protections' reports (`secagg`, `server_dp`),
    the ledger check, and the method's own figures (`ServerResult.privacy`)."""

    protections: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] | None = None
    method: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, record: FederationRecord) -> ServerFigures:
        method = record.result.privacy if record.result is not None else {}
        return cls(protections=record.server_privacy, ledger=record.ledger_check, method=method)


# ---- what the protections spent -----------------------------------------------------------------


def dp_summary(config: RunConfig, clients: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Client DP-SGD: each client's final epsilon (its accountant composes all its rounds) and the run's."""
    dp = config.privacy.dp
    if not dp.enabled:
        return {"enabled": False}
    rows = [row for row in clients if "dp_epsilon" in row]
    if not rows:
        raise PrivacyNotAppliedError("privacy.dp is enabled but no client reported an accountant epsilon")
    per_client: dict[str, float | None] = {}
    by_round: dict[int, float] = {}
    for row in sorted(rows, key=lambda r: r["round"]):
        value = float(row["dp_epsilon"])
        eps = None if value < 0 else value  # -1 encodes an infinite epsilon (no noise)
        per_client[str(row["node_id"])] = eps
        by_round[int(row["round"])] = max(by_round.get(int(row["round"]), 0.0), math.inf if eps is None else eps)
    finite = [e for e in per_client.values() if e is not None]
    run_epsilon = max(finite) if len(finite) == len(per_client) else None
    return {
        "enabled": True,
        "mechanism": "DP-SGD (Opacus: Poisson sampling, per-example clipping, Gaussian noise)",
        "level": "example (each client's training examples)",
        "accountant": dp.accountant.value,
        "noise_multiplier": max(float(r["dp_noise_multiplier"]) for r in rows),
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": max(float(r["dp_sample_rate"]) for r in rows),
        "steps_per_client": max(int(r["dp_steps"]) for r in rows),
        "target_epsilon": dp.target_epsilon,
        "delta": max(float(r["dp_delta"]) for r in rows),
        "epsilon": run_epsilon,  # clients hold disjoint data: the run's epsilon is the largest client's
        "epsilon_per_client": per_client,
        "epsilon_by_round": {str(k): (v if math.isfinite(v) else None) for k, v in sorted(by_round.items())},
    }


def privacy_section(config: RunConfig, results: dict[str, Any], server: ServerFigures | None) -> dict[str, Any]:
    """results.json's `privacy` section from a finished run's results (audits are added separately):
    what the clients' accountants report, and `server`'s figures (None: a finished run audited again,
    whose earlier section keeps them)."""
    earlier = results.get("privacy", {})
    if server is None:
        server = ServerFigures(
            protections={key: earlier[key] for key in ("server_dp", "secagg") if key in earlier},
            ledger=earlier.get("ledger"),
            method={key: value for key, value in earlier.items() if key not in _SECTION_KEYS},
        )
    section: dict[str, Any] = {
        "dp": dp_summary(config, results.get("clients", [])),
        "server_dp": server.protections.get("server_dp", {"enabled": False}),
        "secagg": server.protections.get("secagg", {"enabled": False}),
    }
    if server.ledger is not None:
        section["ledger"] = server.ledger
    section.update(server.method)
    return section


# ---- audits that need the models ----------------------------------------------------------------


def final_adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint under {out_dir / 'checkpoints'}: nothing to audit")
    return checkpoint[1]


def _strategy(config: RunConfig) -> FedAvg | None:
    """The strategy of the adapter clients trained (None: the method has none)."""
    adapter = get_method(config.method).client_adapter(config)
    return None if adapter is None else configured_strategy(config.federation, adapter)


def plugged_final_adapter(
    config: RunConfig, llm: LoadedModel, state: dict[str, torch.Tensor]
) -> AbstractContextManager[nn.Module] | None:
    """A context manager giving the LLM with a run's adapter `state` plugged in, as the run's server
    does (None: the method plugs nothing into the LLM)."""
    return get_method(config.method).plugged_llm(config, llm, state)


def _sample(examples: Sequence[Example], count: int, seed: int) -> list[Example]:
    examples = list(examples)
    if len(examples) <= count:
        return examples
    return random.Random(seed).sample(examples, count)


def trained_members(out_dir: Path, partition: int) -> list[int]:
    """Indices (into client `partition`'s examples) of those it trained on, from the record it keeps."""
    return trained_ids(out_dir / "clients" / f"client-{partition}")


def mia_member_ids(config: RunConfig, out_dir: Path, available_nonmembers: int) -> list[tuple[int, int]]:
    """(partition, index) of the members the audit scores: a sample of what the clients trained on."""
    trained = [
        (partition, index)
        for partition in range(len(client_examples(config)))
        for index in trained_members(out_dir, partition)
    ]
    count = min(config.privacy.audit.mia_examples, len(trained), available_nonmembers)
    return sorted(random.Random(config.seed + 1).sample(trained, count))


def mia_audit(config: RunConfig, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    skipped = {"skipped": f"method {config.method!r} has no adapter to plug into the LLM"}
    if _strategy(config) is None:
        return skipped
    task = config.load_task()
    partitions = client_examples(config)
    held_out = list(task.validation) + list(task.test)
    member_ids = mia_member_ids(config, out_dir, len(held_out))
    if not member_ids:
        return {"skipped": f"no client under {out_dir / 'clients'} recorded the examples it trained on"}
    members = [partitions[partition][index] for partition, index in member_ids]
    nonmembers = _sample(held_out, len(members), config.seed + 2)
    state = final_adapter(out_dir)
    llm = load_model(config.model)
    max_length = config.train.max_length
    batch = config.eval.batch_size

    def losses(model: nn.Module) -> tuple[list[float], list[float]]:
        return (
            example_losses(model, llm.tokenizer, members, max_length, batch),
            example_losses(model, llm.tokenizer, nonmembers, max_length, batch),
        )

    reference = losses(llm.model)
    plugged = plugged_final_adapter(config, llm, state)
    if plugged is None:
        return skipped
    with plugged as adapted:
        target = losses(adapted)
    result = membership_inference(target, reference)
    result["target"] = "LLM with the final global adapter plugged in"
    result["reference"] = "the LLM before adaptation"
    result["mean_reference_loss_members"] = sum(reference[0]) / len(reference[0])
    result["mean_reference_loss_nonmembers"] = sum(reference[1]) / len(reference[1])
    return result


def misuse_audit(config: RunConfig, out_dir: Path, metrics: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """The handed-out artefact as a standalone model, against the LLM (the capability-privacy figure)."""
    workdir = out_dir / "clients" / "client-0"
    if not has_artefact(workdir):
        return {"skipped": f"no handed-out artefact stored in {workdir}"}
    task = config.load_task()
    evaluate = config.eval.evaluator(task, progress)
    texts = [e.prompt + e.target for e in task.test[: config.privacy.audit.perplexity_examples]]
    max_length = config.train.max_length
    llm = load_model(config.model)
    artefact = load_artefact(workdir)
    result: dict[str, Any] = {
        "artefact": "what the server handed to clients (client-0's stored copy)",
        # Non-zero entries: a pruned channel ships as zeros, so it hands out none of the LLM's weights.
        "artefact_parameters": sum(int(torch.count_nonzero(p)) for p in artefact.model.parameters()),
        "llm_parameters": sum(p.numel() for p in llm.model.parameters()),
        "llm_accuracy": metrics.get("llm_zero_shot"),
        "plugin_accuracy": metrics.get("plugin"),
    }
    if result["llm_accuracy"] is None:
        result["llm_accuracy"] = evaluate(llm.model, llm.tokenizer, "LLM")
    result["artefact_accuracy"] = metrics.get("emulator_zero_shot")
    if result["artefact_accuracy"] is None:
        result["artefact_accuracy"] = evaluate(artefact.model, artefact.tokenizer, "artefact")
    batch_size = config.eval.batch_size
    result["llm_perplexity"] = perplexity(
        llm.model, llm.tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=False
    )
    result["artefact_perplexity"] = perplexity(
        artefact.model, artefact.tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=False
    )
    strategy = _strategy(config)
    if strategy is not None:
        layer_map = {int(k): v for k, v in json.loads((workdir / LAYER_MAP_FILE).read_text()).items()}
        channels = stored_mlp_channels(workdir)  # a compact artefact takes the adapter cut to its channels
        adapter = channels.compact_state(final_adapter(out_dir), layer_map)
        adapted = strategy.prepare_client(artefact.model, adapter, layer_map, None, config.seed)
        # The server scored the final adapter on its copy of the hand-out already (the transfer gap's row).
        result["artefact_adapted_accuracy"] = metrics.get("plugin_on_hand_out")
        if result["artefact_adapted_accuracy"] is None:
            result["artefact_adapted_accuracy"] = evaluate(adapted.model, artefact.tokenizer, "artefact + adapter")
        result["artefact_adapted_perplexity"] = perplexity(
            adapted.model, artefact.tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=False
        )
    result["perplexity_ratio"] = result["artefact_perplexity"] / result["llm_perplexity"]
    best_artefact = max(
        a for a in (result["artefact_accuracy"], result.get("artefact_adapted_accuracy")) if a is not None
    )
    if result["plugin_accuracy"] is not None:
        # How much better the owner's plugged-in LLM stays than anything a client can run by itself.
        result["capability_gap"] = result["plugin_accuracy"] - best_artefact
    return result


def run_audits(
    config: RunConfig,
    out_dir: Path,
    results: dict[str, Any],
    server: ServerFigures | None = None,
    *,
    membership: bool | None = None,
    misuse: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The full `privacy` section: what was spent plus the audits the config (or the caller) asks for;
    `server`: what the run's server recorded (None: a finished run audited again)."""
    earlier = results.get("privacy", {})
    section = privacy_section(config, results, server)
    audit = config.privacy.audit
    if audit.membership_inference if membership is None else membership:
        log.info("membership inference audit")
        section["membership_inference"] = mia_audit(config, out_dir, progress)
    elif "membership_inference" in earlier:  # audited before: keep it
        section["membership_inference"] = earlier["membership_inference"]
    if audit.misuse if misuse is None else misuse:
        log.info("artefact misuse audit")
        section["misuse"] = misuse_audit(config, out_dir, results.get("metrics", {}), progress)
    elif "misuse" in earlier:
        section["misuse"] = earlier["misuse"]
    return section


def audit_run(run_dir: Path, *, membership: bool = True, misuse: bool = True, progress: bool = False) -> dict[str, Any]:
    """Audit a finished run directory again: rewrite its results.json `privacy` section and report.md."""
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file}: no such file (audit needs a finished run directory)")
    try:
        results = json.loads(results_file.read_text())
    except json.JSONDecodeError as error:
        raise ResultsError(f"{results_file}:{error.lineno}: not valid JSON ({error.msg}); rerun the run") from None
    config = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    results["privacy"] = run_audits(config, run_dir, results, membership=membership, misuse=misuse, progress=progress)
    results_file.write_text(json.dumps(results, indent=2))
    write_report([results], run_dir, title=f"blindtune {config.method} on {config.task}")
    add_privacy_section(run_dir / "report.md", [results])
    return results
