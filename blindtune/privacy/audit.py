"""Privacy audits of a finished run, and the `privacy` section of its results.json.

- `dp`, `server_dp`, `secagg`: what the run's protections spent, from the clients' accountants (each
  client reports its epsilon with every update) and the server's round loop;
- `ledger`: the ledger check (`blindtune.privacy.ledger_check`), done while the run ran;
- `membership_inference`: loss and reference loss-ratio attacks on the LLM with the final adapter
  plugged in (`blindtune.privacy.mia`); members are client training examples, non-members the task's
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.config import RunConfig
from blindtune.data import Example, load_task
from blindtune.encoding import pad_right
from blindtune.privacy.context import PrivacyNotAppliedError, ServerPrivacy
from blindtune.privacy.ledger_check import TrafficAudit, check
from blindtune.privacy.mia import example_losses, membership_inference

if TYPE_CHECKING:
    from blindtune.models.loading import LoadedModel

log = logging.getLogger(__name__)

# Keys the server app adds to federation.json (and the runner to results.json's details).
SERVER_PRIVACY = "privacy_server"
TRAFFIC_CHECK = "privacy_ledger"
# A method's own privacy figures, returned by its server side (FedCoT: the text-privatisation budget,
# epsilon_per_token / epsilon_per_prompt, and the recovery attack's rates); lifted into the section.
METHOD_PRIVACY = "privacy_method"
_SECTION_KEYS = ("dp", "server_dp", "secagg", "ledger", "membership_inference", "misuse")


def client_examples(config: RunConfig) -> list[list[Example]]:
    """Each client's training examples as its client app sees them (after `limit_client_examples`)."""
    from blindtune.federation.apps import client_partitions

    limit = config.privacy.audit.limit_client_examples
    return [examples[:limit] if limit is not None else examples for examples in client_partitions(config)]


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


def server_privacy_results(
    config: RunConfig, method: Any, policy: ServerPrivacy | None, traffic: TrafficAudit | None
) -> dict[str, Any]:
    """What the server app adds to federation.json: its protections' report and the ledger check."""
    added: dict[str, Any] = {}
    if policy is not None and policy.report:
        added[SERVER_PRIVACY] = policy.report
    if traffic is not None:
        from blindtune.federation.apps import client_partitions

        privatised = tuple(getattr(method, "privatised_text_records", ()))
        # Everything the clients hold, not only what they trained on, counts as their raw text.
        added[TRAFFIC_CHECK] = check(traffic, client_partitions(config), privatised, config.privacy.dp.enabled)
    return added


def privacy_section(config: RunConfig, results: dict[str, Any]) -> dict[str, Any]:
    """results.json's `privacy` section from a finished run's results (audits are added separately).

    The server app's privacy records move from `details` into the section (or come from an earlier
    section, when a finished run is audited again)."""
    details = results.get("details", {})
    earlier = results.get("privacy", {})
    server = details.pop(SERVER_PRIVACY, None) or {
        key: earlier[key] for key in ("server_dp", "secagg") if key in earlier
    }
    ledger = details.pop(TRAFFIC_CHECK, None) or earlier.get("ledger")
    section: dict[str, Any] = {
        "dp": dp_summary(config, results.get("clients", [])),
        "server_dp": server.get("server_dp", {"enabled": False}),
        "secagg": server.get("secagg", {"enabled": False}),
    }
    if ledger is not None:
        section["ledger"] = ledger
    method = details.pop(METHOD_PRIVACY, None)
    if method is None:  # audited again: keep what the method reported the first time
        method = {key: value for key, value in earlier.items() if key not in _SECTION_KEYS}
    section.update(method)
    return section


# ---- audits that need the models ----------------------------------------------------------------


def final_adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    from blindtune.federation.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint under {out_dir / 'checkpoints'}: nothing to audit")
    return checkpoint[1]


def _strategy(config: RunConfig) -> Any:
    adapter = getattr(config.method_config, "adapter", None)
    if adapter is None:
        return None
    from blindtune.federation.strategies import configured_strategy

    return configured_strategy(config.federation, adapter)


def plugged_final_adapter(config: RunConfig, llm: LoadedModel, state: dict[str, torch.Tensor]) -> Any:
    """A context manager giving the LLM with a run's adapter `state` plugged in, as the run's server does."""
    from blindtune.methods import get_method

    # A method whose adapter does not fit the LLM as is (FedProxy's fits its proxy) says how to plug it in.
    method_plug = getattr(get_method(config.method), "plugged_llm", None)
    if method_plug is not None:
        return method_plug(config, llm, state)
    strategy = _strategy(config)
    if strategy is None:
        raise ValueError(f"method {config.method!r} has no adapter to plug into the LLM")
    return strategy.plugged_in(llm.model, state)


def _sample(examples: Sequence[Example], count: int, seed: int) -> list[Example]:
    examples = list(examples)
    if len(examples) <= count:
        return examples
    return random.Random(seed).sample(examples, count)


def trained_members(out_dir: Path, partition: int) -> list[int]:
    """Indices (into client `partition`'s examples) of those it trained on, from the record it keeps."""
    from blindtune.federation.adapter_rounds import trained_ids

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
    from blindtune.models import load_model

    strategy = _strategy(config)
    if strategy is None:
        return {"skipped": f"method {config.method!r} has no adapter to plug into the LLM"}
    task = load_task(config.task, config.data_dir, seed=config.seed)
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
    with plugged_final_adapter(config, llm, state) as adapted:
        target = losses(adapted)
    result = membership_inference(target, reference)
    result["target"] = "LLM with the final global adapter plugged in"
    result["reference"] = "the LLM before adaptation"
    result["mean_reference_loss_members"] = sum(reference[0]) / len(reference[0])
    result["mean_reference_loss_nonmembers"] = sum(reference[1]) / len(reference[1])
    return result


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, batch_size: int = 16
) -> float:
    """exp(mean negative log-likelihood per predicted token) of `texts` (each cut to `max_length` tokens)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in range(0, len(texts), batch_size):
            ids = [list(tokenizer(text)["input_ids"])[:max_length] for text in texts[start : start + batch_size]]
            input_ids, attention_mask = pad_right(ids, pad_id)
            device = next(model.parameters()).device
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logprobs = logits[:, :-1].float().log_softmax(dim=-1)
            targets = input_ids[:, 1:].to(device)
            mask = attention_mask[:, 1:].to(device).float()
            nll = -(logprobs.gather(-1, targets[..., None]).squeeze(-1) * mask).sum()
            total_nll += float(nll)
            total_tokens += int(mask.sum())
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


def misuse_audit(config: RunConfig, out_dir: Path, metrics: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """The handed-out artefact as a standalone model, against the LLM (the capability-privacy figure)."""
    from blindtune.federation.adapter_rounds import _LAYER_MAP_FILE
    from blindtune.models import load_model
    from blindtune.models.artefact import has_artefact, load_artefact

    workdir = out_dir / "clients" / "client-0"
    if not has_artefact(workdir):
        return {"skipped": f"no handed-out artefact stored in {workdir}"}
    task = load_task(config.task, config.data_dir, seed=config.seed)
    evaluate = config.eval.evaluator(task, progress)
    texts = [e.prompt + e.target for e in task.test[: config.privacy.audit.perplexity_examples]]
    max_length = config.train.max_length
    llm = load_model(config.model)
    artefact = load_artefact(workdir)
    result: dict[str, Any] = {
        "artefact": "what the server handed to clients (client-0's stored copy)",
        "artefact_parameters": sum(p.numel() for p in artefact.model.parameters()),
        "llm_parameters": sum(p.numel() for p in llm.model.parameters()),
        "llm_accuracy": metrics.get("llm_zero_shot"),
        "plugin_accuracy": metrics.get("plugin"),
    }
    if result["llm_accuracy"] is None:
        result["llm_accuracy"] = evaluate(llm.model, llm.tokenizer, "LLM")
    result["artefact_accuracy"] = metrics.get("emulator_zero_shot")
    if result["artefact_accuracy"] is None:
        result["artefact_accuracy"] = evaluate(artefact.model, artefact.tokenizer, "artefact")
    result["llm_perplexity"] = perplexity(llm.model, llm.tokenizer, texts, max_length, config.eval.batch_size)
    result["artefact_perplexity"] = perplexity(
        artefact.model, artefact.tokenizer, texts, max_length, config.eval.batch_size
    )
    strategy = _strategy(config)
    if strategy is not None:
        layer_map = {int(k): v for k, v in json.loads((workdir / _LAYER_MAP_FILE).read_text()).items()}
        adapted = strategy.prepare_client(artefact.model, final_adapter(out_dir), layer_map, None, config.seed)
        result["artefact_adapted_accuracy"] = evaluate(adapted.model, artefact.tokenizer, "artefact + adapter")
        result["artefact_adapted_perplexity"] = perplexity(
            adapted.model, artefact.tokenizer, texts, max_length, config.eval.batch_size
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
    *,
    membership: bool | None = None,
    misuse: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The full `privacy` section: what was spent plus the audits the config (or the caller) asks for."""
    earlier = results.get("privacy", {})
    section = privacy_section(config, results)
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
    from blindtune.config import run_config_from_dict
    from blindtune.privacy.report import add_privacy_section
    from blindtune.report import write_report

    results_file = run_dir / "results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"{results_file}: no such file (audit needs a finished run directory)")
    results = json.loads(results_file.read_text())
    config = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    results["privacy"] = run_audits(config, run_dir, results, membership=membership, misuse=misuse, progress=progress)
    results_file.write_text(json.dumps(results, indent=2))
    write_report([results], run_dir, title=f"blindtune {config.method} on {config.task}")
    add_privacy_section(run_dir / "report.md", [results])
    return results
