"""FedCoT (Fan et al., Findings of EMNLP 2025), server side.

    blindtune run blindtune/configs/fedcot_wordnet_3clients.yaml --out runs/fedcot

1. Build the client SLM from the LLM (layer drop, or the compressed proxy) and evaluate the LLM and the
   SLM zero-shot.
2. Hand the SLM to every client once (`query.setup`); each replies with its privatised prompts
   (exponential mechanism, see `blindtune.privacy.text_privatisation`): the only client text the
   server ever receives (the ledger check reads every reply and names that record).
3. Rationale service: the LLM explains each privatised prompt (batched greedy generation, a prompt
   template per task); each client gets its own rationales back (`query.setup`, per client).
4. Rounds: clients train LoRA on their SLM with L = L_label + lambda * L_rationale and send their LoRA
   state (trained on their raw prompts: unprotected without `privacy.dp`, DP-SGD with it); the server
   FedAvg's the LoRA states and evaluates the SLM with the global LoRA on the label prompts.
Privacy (results.json `privacy`): `epsilon_per_record` is the headline, the per-record (per-prompt)
epsilon with every channel counted: the prompt's privatisation plus the LoRA channel (infinite
without DP). `epsilon_per_prompt` is the text channel alone, `epsilon_per_token` a detail.
5. Reference pass (`label_only_baseline`): the same rounds with lambda = 0 (labels only), on a
   separate ledger so the run's cost is FedCoT's alone.

metrics: llm_zero_shot (the LLM, task prompts), emulator_zero_shot (the SLM before training, label
prompts), plugin (the clients' SLM after FedCoT training, i.e. with rationales), label_only (the SLM
after label-only federated training, same budget).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, RecordDict
from torch import nn

from blindtune.data import TaskKind
from blindtune.federation.adapter_rounds import (
    ADAPTER_POSITIONS,
    ADAPTER_SOURCES,
    RoundSettings,
    RoundsOutcome,
    run_rounds,
    same_for_all,
)
from blindtune.federation.records import MessageKind, RecordKey, number, tensors_to_record
from blindtune.federation.rounds import Exchange
from blindtune.federation.strategies import configured_strategy
from blindtune.methods.base import ServerResult, ServerRun
from blindtune.methods.fedcot.client import INFINITE, LABEL_AND_RATIONALE, LABEL_ONLY, OBJECTIVE, TEXTS, texts
from blindtune.methods.fedcot.config import FedCoTConfig, RationaleSource
from blindtune.methods.fedcot.rationales import generate_rationales, label_task, rationale_template
from blindtune.models import load_model
from blindtune.models.adapters import AdapterState, untrained_adapter_state
from blindtune.models.artefact import describe, unique_state_dict
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import build_emulator, num_decoder_layers, plan_layers

if TYPE_CHECKING:
    from blindtune.config import RunConfig

log = logging.getLogger(__name__)

SETUP_ROUND = 0  # the ledger's round number of the hand-out and the training plans
PRIVATISED_RECORDS = (str(RecordKey.PRIVATISED_PROMPTS),)
RATIONALE_SAMPLES = 3  # privatised prompts and rationales shown in results.json (server-side texts)


def build_slm(llm: LoadedModel, config: RunConfig, progress: bool) -> LoadedModel:
    """The client SLM: the LLM compressed by layer drop, or the server-guided compressed proxy."""
    method: FedCoTConfig = config.method_config
    if method.slm_compression is not None:
        from blindtune.models.compression import prepare_proxy
        from blindtune.models.distill import public_texts

        texts = public_texts(method.public_text, config.task, config.seed).train
        proxy = prepare_proxy(
            llm.model, llm.tokenizer, texts, method.slm_compression, seed=config.seed, progress=progress
        )
        return LoadedModel(proxy.model, llm.tokenizer, "slm")
    plan = plan_layers(num_decoder_layers(llm.model), method.slm_layers_per_side, method.slm_keep_every)
    return LoadedModel(build_emulator(llm.model, plan), llm.tokenizer, "slm")


def every_layer(model: nn.Module) -> dict[int, int]:
    """LoRA goes on every SLM layer, named by its SLM position (the SLM is the model that is adapted)."""
    return {i: i for i in range(num_decoder_layers(model))}  # type: ignore[arg-type]


def hand_out_content(slm: LoadedModel) -> RecordDict:
    """The SLM as it travels: weights, architecture and tokenizer, and its (every-layer) LoRA layer map."""
    layers = list(every_layer(slm.model))
    return RecordDict(
        {
            RecordKey.ARTEFACT: tensors_to_record(unique_state_dict(slm.model)),
            RecordKey.ARTEFACT_SPEC: ConfigRecord({"json": describe(slm).to_json()}),
            RecordKey.INSTRUCTIONS: ConfigRecord({ADAPTER_POSITIONS: layers, ADAPTER_SOURCES: layers}),
        }
    )


def hand_out_and_collect(exchange: Exchange, slm: LoadedModel, min_replies: int) -> dict[int, RecordDict]:
    """Send the SLM to every client; their replies carry the privatised prompts."""
    setup = hand_out_content(slm)
    return exchange.send(MessageKind.SETUP, same_for_all(setup), exchange.node_ids(), SETUP_ROUND, min_replies)


def send_plan(
    exchange: Exchange, objective: str, rationales: dict[int, list[str]] | None, nodes: list[int], min_replies: int
) -> dict[int, RecordDict]:
    """Tell the clients what the next rounds train, with each client's own rationales."""

    def content_for(node: int) -> RecordDict:
        content = RecordDict({RecordKey.INSTRUCTIONS: ConfigRecord({OBJECTIVE: objective})})
        if rationales is not None:
            content[RecordKey.RATIONALES] = ConfigRecord({TEXTS: rationales[node]})
        return content

    return exchange.send(MessageKind.SETUP, content_for, nodes, SETUP_ROUND, min_replies)


def privacy_summary(method: FedCoTConfig, replies: dict[int, RecordDict]) -> dict[str, Any]:
    """The budget the clients spent on their prompts and the recovery attack's rates (token-weighted)."""
    config = method.privatisation
    top_k = f"recovery_rate_top{config.attack_top_k}"
    keys = ["private_tokens", "num_prompts", "epsilon_per_token_max", "epsilon_per_prompt_max"]
    keys += ["epsilon_per_prompt_sum", "recovery_rate", top_k]
    metrics = [{key: number(reply, RecordKey.METRICS, key) for key in keys} for reply in replies.values()]
    tokens = int(sum(m["private_tokens"] for m in metrics))
    prompts = int(sum(m["num_prompts"] for m in metrics))

    def largest(key: str) -> float | None:
        values = [m[key] for m in metrics]
        return None if INFINITE in values else max(values)

    prompt_sum = [m["epsilon_per_prompt_sum"] for m in metrics]
    return {
        "mechanism": "exponential mechanism over the SLM vocabulary, cosine utility of input embeddings, "
        "sensitivity 2; basic composition per prompt (null epsilon: infinite, no privatisation); template "
        "lines (shared by many of a client's prompts) and short field labels are public and sent unchanged",
        "adaptive": config.adaptive,
        "epsilon_configured_per_token": config.epsilon if math.isfinite(config.epsilon) else None,
        "epsilon_per_token": largest("epsilon_per_token_max"),
        "epsilon_per_prompt": largest("epsilon_per_prompt_max"),
        "epsilon_per_prompt_mean": None if INFINITE in prompt_sum or not prompts else sum(prompt_sum) / prompts,
        "prompts": prompts,
        "private_tokens": tokens,
        "recovery_rate": sum(m["recovery_rate"] * m["private_tokens"] for m in metrics) / max(tokens, 1),
        top_k: sum(m[top_k] * m["private_tokens"] for m in metrics) / max(tokens, 1),
        "attack": "nearest-neighbour inversion in the SLM's input-embedding space (the attacker holds it too)",
    }


def record_privacy(text_epsilon: float | None, clients: list[dict[str, Any]], dp_enabled: bool) -> dict[str, Any]:
    """The per-record (per-prompt) guarantee, every channel counted: a record's privatised prompt
    (`text_epsilon`, the largest over prompts; None: infinite) plus the LoRA states trained on it (the
    clients' DP-SGD epsilon; infinite without DP), by basic composition."""
    if dp_enabled:
        spent = [float(row["dp_epsilon"]) for row in clients if "dp_epsilon" in row]
        adapter = None if not spent or INFINITE in spent else max(spent)
        deltas = [float(row["dp_delta"]) for row in clients if "dp_delta" in row]
        channel = "LoRA state trained by DP-SGD (per-record accounting, one row per record)"
    else:
        adapter, deltas = None, []
        channel = "LoRA state sent every round without DP: no epsilon covers it"
    total = None if text_epsilon is None or adapter is None else text_epsilon + adapter
    return {
        "epsilon_per_record": total,  # the headline; null: infinite
        "delta_per_record": max(deltas, default=0.0),
        "epsilon_per_record_parts": {"privatised_prompt": text_epsilon, "lora_adapter": adapter},
        "adapter_channel": channel,
    }


def federate_slm(
    exchange: Exchange,
    run: ServerRun,
    slm: nn.Module,
    initial: AdapterState,
    evaluate: Any,
    checkpoint_name: str,
) -> RoundsOutcome:
    config = run.config
    method: FedCoTConfig = config.method_config
    settings = RoundSettings.of_run(config, run.out_dir / checkpoint_name, run.resume)
    strategy = configured_strategy(config.federation, method.adapter)
    return run_rounds(exchange, initial, settings, strategy, slm, evaluate)


def run_server(run: ServerRun) -> ServerResult:
    config = run.config
    method: FedCoTConfig = config.method_config
    if config.privacy.dp.enabled and method.label_only_baseline:
        raise ValueError(
            "fedcot: label_only_baseline is not supported under DP-SGD (a second training pass on the same "
            "records would spend more budget): set fedcot.label_only_baseline: false"
        )
    if config.privacy.audit.membership_inference:
        # That audit plugs the final adapter into the LLM; FedCoT's LoRA belongs to the SLM's layers.
        raise ValueError("fedcot: privacy.audit.membership_inference does not apply (the adapter is the SLM's)")
    llm = load_model(config.model)
    task = config.load_task()
    if task.kind is TaskKind.INSTRUCTION:  # its rationales explain a label or an answer; a response has neither
        raise ValueError(f"fedcot is not supported for this task kind ({task.kind}): use offsite, lleot or fedproxy")
    slm = build_slm(llm, config, run.progress)
    evaluate_label = config.eval.evaluator(label_task(task, method), run.progress)
    evaluate_task = config.eval.evaluator(task, run.progress)
    metrics = {
        "llm_zero_shot": evaluate_task(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True),
        "emulator_zero_shot": evaluate_label(slm.model, slm.tokenizer, "SLM zero-shot"),
    }
    initial = untrained_adapter_state(copy.deepcopy(slm.model), every_layer(slm.model), method.adapter, config.seed)
    min_replies = config.federation.required_replies

    replies = hand_out_and_collect(run.exchange, slm, min_replies)
    nodes = sorted(replies)
    details: dict[str, Any] = {}
    privacy: dict[str, Any] = {}
    rationales = None
    if method.rationale_source is RationaleSource.SERVER:
        template = rationale_template(method, task)
        privatised = {node: texts(reply, RecordKey.PRIVATISED_PROMPTS) for node, reply in replies.items()}
        rationales = {
            node: generate_rationales(llm.model, llm.tokenizer, prompts, template, method, run.progress, f"node {node}")
            for node, prompts in privatised.items()
        }
        first = nodes[0]
        privacy = privacy_summary(method, replies)
        details["rationale_samples"] = [
            {"privatised_prompt": prompt, "rationale": rationale}
            for prompt, rationale in list(zip(privatised[first], rationales[first], strict=True))[:RATIONALE_SAMPLES]
        ]
        details["rationale_template"] = template
    del llm
    plan_replies = send_plan(run.exchange, LABEL_AND_RATIONALE, rationales, nodes, min_replies)
    details["rationales"] = {
        "source": method.rationale_source.value,
        "received": int(sum(number(r, RecordKey.METRICS, "rationales_received") for r in plan_replies.values())),
        "kept": int(sum(number(r, RecordKey.METRICS, "rationales_kept") for r in plan_replies.values())),
        "filtered": method.filter_rationales,
    }

    def evaluate_plugin(adapted: nn.Module, round_number: int) -> float:
        scorer = evaluate_label.in_round(round_number, config.federation.rounds)
        return scorer(adapted, slm.tokenizer, f"SLM with rationales, round {round_number}")

    outcome = federate_slm(run.exchange, run, slm.model, initial, evaluate_plugin, "checkpoints")
    metrics["plugin"] = outcome.history[-1]["plugin"]
    privacy = privacy or {"epsilon_per_prompt": 0.0, "note": "oracle rationales: no text sent"}
    privacy.update(record_privacy(privacy["epsilon_per_prompt"], outcome.clients, config.privacy.dp.enabled))
    if method.label_only_baseline:
        # A reference measurement: its own ledger, so results.json's cost is FedCoT's alone.
        reference = Exchange(run.exchange.grid, timeout_seconds=run.exchange.timeout_seconds)
        send_plan(reference, LABEL_ONLY, None, nodes, min_replies)

        def evaluate_label_only(adapted: nn.Module, round_number: int) -> float:
            scorer = evaluate_label.in_round(round_number, config.federation.rounds)
            return scorer(adapted, slm.tokenizer, f"SLM label-only, round {round_number}")

        label_only = federate_slm(reference, run, slm.model, initial, evaluate_label_only, "label_only/checkpoints")
        metrics["label_only"] = label_only.history[-1]["plugin"]
        details["label_only"] = {
            "history": label_only.history,
            "cost": reference.ledger.to_dict(),
            "failures": [f.to_dict() for f in reference.failures],
        }
    details["slm"] = {
        "layers": num_decoder_layers(slm.model),
        "parameters": sum(p.numel() for p in slm.model.parameters()),
        "compressed_proxy": method.slm_compression is not None,
    }
    return ServerResult(metrics, outcome.history, outcome.clients, privacy=privacy, details=details)
