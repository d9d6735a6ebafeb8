"""What every adapter-on-a-handed-out-model method shares (offsite tuning, LLEOT, FedProxy's
clients): the client's answer to each message, the server's round loop settings, the emulator
server's body (offsite tuning's; LLEOT's differs only in the emulator it hands out), and the
reference rows' training."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import RecordDict
from torch import nn
from transformers import PreTrainedModel

from blindtune.data import load_task
from blindtune.data.task import TaskData
from blindtune.eval.leakage import (
    LeakageConfig,
    ZeroShot,
    adapter_gradient_cosine,
    chance_accuracy,
    leakage_report,
)
from blindtune.federation.adapter_rounds import (
    RoundSettings,
    RoundsOutcome,
    hand_out,
    run_rounds,
    store_artefact,
    train_round,
)
from blindtune.federation.records import MessageKind
from blindtune.federation.strategies import FedAvg, configured_strategy
from blindtune.methods.base import BaselineInputs, ClientRun, ServerResult, ServerRun
from blindtune.models.adapters import AdapterConfig, AdapterState, attach_adapter, plugged_in, untrained_adapter_state
from blindtune.models.compact import compacted
from blindtune.models.distill import public_texts
from blindtune.models.loading import LoadedModel
from blindtune.models.surgery import LayerPlan, adapter_layer_map


def answer_client(kind: MessageKind, content: RecordDict, run: ClientRun, adapter: AdapterConfig) -> RecordDict:
    """Store the artefact (setup), or train this client's adapter for one round."""
    if kind is MessageKind.SETUP:
        return store_artefact(content, run.workdir)
    federation = run.config.federation
    strategy = configured_strategy(federation, adapter)
    batch_size = federation.client_batch_size(run.partition_id, run.config.train.batch_size)
    return train_round(
        content,
        run.workdir,
        run.examples,
        strategy,
        dataclasses.replace(run.config.train, batch_size=batch_size),
        run.partition_id,
        federation.client_rank(run.partition_id),
    )


def federate(
    run: ServerRun,
    strategy: FedAvg,
    initial: AdapterState,
    llm: nn.Module,
    evaluate: Callable[[nn.Module, int], float],
    diagnose: Callable[[AdapterState, int], dict[str, float]] | None = None,
) -> RoundsOutcome:
    """The configured rounds of adapter training with `strategy` (the run's `configured_strategy`, which
    the caller also uses to put the global adapter on the hand-out)."""
    settings = RoundSettings.of_run(run.config, run.out_dir / "checkpoints", run.resume)
    return run_rounds(run.exchange, initial, settings, strategy, llm, evaluate, diagnose)


def measure_leakage(
    run: ServerRun,
    llm: LoadedModel,
    emulator: HandedOutEmulator,
    public_text: str,
    leakage: LeakageConfig,
    task: TaskData,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """results.json `privacy.emulator`: what the hand-out alone can do, on the run's task (its zero-shot
    scores in `metrics`), the configured extra tasks and those optional tasks whose data is present."""
    config = run.config
    zero_shot = {
        config.task: ZeroShot(
            metrics["llm_zero_shot"], metrics["emulator_zero_shot"], chance_accuracy(task.test[: config.eval.limit])
        )
    }
    skipped: dict[str, str] = {}
    for name in [*leakage.extra_tasks, *leakage.optional_tasks]:
        if name in zero_shot:
            continue
        try:
            other = load_task(name, seed=config.seed)
        except FileNotFoundError as missing:
            if name not in leakage.optional_tasks:
                raise
            skipped[name] = str(missing)
            continue
        evaluate_other = config.eval.evaluator(other, run.progress)
        zero_shot[name] = ZeroShot(
            evaluate_other(llm.model, llm.tokenizer, f"LLM zero-shot {name}", reuse=True),
            evaluate_other(emulator.model, llm.tokenizer, f"emulator zero-shot {name}"),
            chance_accuracy(other.test[: config.eval.limit]),
        )
    heldout = public_texts(public_text, config.task, config.seed).heldout
    report = leakage_report(
        llm.model,
        emulator.model,
        llm.tokenizer,
        heldout,
        zero_shot,
        margin=emulator.margin,
        max_length=leakage.ppl_max_length,
    )
    if skipped:
        report["skipped_tasks"] = skipped
    return report


@dataclass
class EmulatorSettings:
    """What the emulator server needs of a method's config (offsite's and LLEOT's share these fields)."""

    adapter: AdapterConfig
    train_top_layers: bool
    public_text: str
    privacy: LeakageConfig | None
    adapt_middle_layers: bool = False


@dataclass
class HandedOutEmulator:
    """The emulator the server hands out: its layer plan, the model, what it was trained to (the
    elevation margin H, if any) and how it was built (results.json `details.emulator`)."""

    plan: LayerPlan
    model: PreTrainedModel
    margin: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def serve_emulator(
    run: ServerRun, llm: LoadedModel, emulator: HandedOutEmulator, method: EmulatorSettings
) -> ServerResult:
    """The server side of an emulator method: evaluate the LLM and the emulator zero-shot, measure
    what the emulator leaks (when `method.privacy` asks), hand it out, run the adapter rounds, and
    evaluate the LLM with the global adapter plugged in."""
    config = run.config
    task = config.load_task()
    evaluate = config.eval.evaluator(task, run.progress)
    # What clients get, at its real size (the same function as `emulator.model`, cheaper to score).
    compact, channels = compacted(emulator.model)
    metrics = {
        "llm_zero_shot": evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True),
        "emulator_zero_shot": evaluate(compact, llm.tokenizer, "emulator zero-shot"),
    }
    layer_map = adapter_layer_map(emulator.plan, method.train_top_layers, method.adapt_middle_layers)
    initial = untrained_adapter_state(copy.deepcopy(emulator.model), layer_map, method.adapter, config.seed)
    leakage = method.privacy
    privacy: dict[str, Any] | None = None
    if leakage is not None:
        measured = dataclasses.replace(emulator, model=compact)
        privacy = measure_leakage(run, llm, measured, method.public_text, leakage, task, metrics)
    gradient_examples = task.validation[: leakage.gradient_examples if leakage else 8] or task.train[:8]

    def gradient_cosine(state: AdapterState) -> float:
        return adapter_gradient_cosine(
            llm.model, emulator.model, layer_map, method.adapter, state, llm.tokenizer, gradient_examples
        )

    if privacy is not None:
        privacy["gradient_cosine"] = gradient_cosine(initial)

    def is_complete_adapter(state: AdapterState) -> bool:
        return set(state) == set(initial) and all(state[name].shape == initial[name].shape for name in initial)

    hand_out(
        run.exchange,
        LoadedModel(compact, llm.tokenizer, "emulator"),
        layer_map,
        config.federation.required_replies,
        channels,
    )

    rounds = config.federation.rounds

    def evaluate_plugin(adapted: nn.Module, round_number: int) -> float:
        return evaluate.in_round(round_number, rounds)(adapted, llm.tokenizer, f"plug-in round {round_number}")

    strategy = configured_strategy(config.federation, method.adapter)

    def transfer(state: AdapterState, round_number: int) -> dict[str, float]:
        """What explains transfer: the global adapter on the hand-out itself (its accuracy there minus
        the plug-in's is the transfer gap) and the cosine of its gradients on the hand-out and the LLM."""
        if not is_complete_adapter(state):  # FLoRA's stack of products: no single adapter to measure
            return {}
        on_hand_out = strategy.prepare_client(
            copy.deepcopy(compact), channels.compact_state(state, layer_map), layer_map, None, config.seed
        )
        return {
            "hand_out": evaluate.in_round(round_number, rounds)(
                on_hand_out.model, llm.tokenizer, f"on the hand-out, round {round_number}"
            ),
            "gradient_cosine": gradient_cosine(state),
        }

    outcome = federate(run, strategy, initial, llm.model, evaluate_plugin, transfer)
    metrics["plugin"] = outcome.history[-1]["plugin"]
    result = ServerResult(metrics, outcome.history, outcome.clients, details={"emulator": emulator.details})
    final = outcome.history[-1]
    if "hand_out" in final:
        metrics["plugin_on_hand_out"] = final["hand_out"]
        metrics["transfer_gap"] = final["hand_out"] - final["plugin"]
    if privacy is not None:
        if "gradient_cosine" in final:
            privacy["gradient_cosine_final"] = final["gradient_cosine"]
        metrics.update({key: privacy[key] for key in ("cpl", "capability_retained", "ppl_ratio", "gradient_cosine")})
        result.privacy = {"emulator": privacy}
    return result


def centralized_adapter(
    inputs: BaselineInputs, llm: LoadedModel, layers: tuple[int, ...], adapter: AdapterConfig
) -> float:
    """Upper bound: the adapter trained on the LLM's own layers with the pooled client data."""
    config = inputs.config
    adapted = attach_adapter(llm.model, {i: i for i in layers}, adapter, seed=config.seed)
    inputs.train_reference(adapted.model, llm.tokenizer, inputs.pooled_examples(), "centralized", inputs.same_budget())
    return inputs.evaluate(adapted.model, llm.tokenizer, "centralized")


def local_only_adapter(
    inputs: BaselineInputs, llm: LoadedModel, artefact: nn.Module, layer_map: dict[int, int], adapter: AdapterConfig
) -> float:
    """Lower bound: client 0 trains the adapter on the artefact alone, compact as clients get it
    (`hand_out`), from the federation's starting adapter; plugged into the LLM."""
    config = inputs.config
    initial = untrained_adapter_state(copy.deepcopy(artefact), layer_map, adapter, config.seed)
    model, channels = compacted(artefact)
    adapted = attach_adapter(model, layer_map, adapter, seed=config.seed)
    adapted.load_state(channels.compact_state(initial, layer_map))
    inputs.train_reference(
        adapted.model, llm.tokenizer, inputs.client_examples[0], "local only", inputs.client_budget()
    )
    trained = channels.full_state(adapted.state(), initial, layer_map)
    with plugged_in(llm.model, trained, adapter) as plugged:
        return inputs.evaluate(plugged, llm.tokenizer, "local only")
