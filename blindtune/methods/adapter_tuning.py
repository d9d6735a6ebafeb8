"""What every adapter-on-a-handed-out-model method shares (offsite tuning, LLEOT): the client's
answer to each message, the server's round loop settings, and the reference rows' training."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flwr.app import RecordDict
from torch import nn

from blindtune.federation.adapter_rounds import (
    RoundSettings,
    RoundsOutcome,
    run_rounds,
    store_artefact,
    train_round,
)
from blindtune.federation.records import MessageKind
from blindtune.federation.strategies import configured_strategy
from blindtune.methods.base import BaselineInputs, ClientRun, ServerRun
from blindtune.models.adapters import AdapterConfig, AdapterState, attach_adapter, plugged_in
from blindtune.models.loading import LoadedModel


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
    adapter: AdapterConfig,
    initial: AdapterState,
    llm: nn.Module,
    evaluate: Callable[[nn.Module, int], float],
) -> RoundsOutcome:
    """The configured rounds of adapter training, with the configured strategy."""
    config = run.config
    settings = RoundSettings.of_run(config, run.out_dir / "checkpoints", run.resume)
    strategy = configured_strategy(config.federation, adapter)
    return run_rounds(run.exchange, initial, settings, strategy, llm, evaluate)


def centralized_adapter(
    inputs: BaselineInputs, llm: LoadedModel, layers: tuple[int, ...], adapter: AdapterConfig
) -> float:
    """Upper bound: the adapter trained on the LLM's own layers with the pooled client data."""
    config = inputs.config
    adapted = attach_adapter(llm.model, {i: i for i in layers}, adapter, seed=config.seed)
    inputs.train_reference(adapted.model, llm.tokenizer, inputs.pooled_examples(), "centralized")
    return inputs.evaluate(adapted.model, llm.tokenizer, "centralized")


def local_only_adapter(
    inputs: BaselineInputs, llm: LoadedModel, artefact: nn.Module, layer_map: dict[int, int], adapter: AdapterConfig
) -> float:
    """Lower bound: client 0 trains the adapter on the artefact alone; plugged into the LLM."""
    config = inputs.config
    adapted = attach_adapter(artefact, layer_map, adapter, seed=config.seed)
    inputs.train_reference(adapted.model, llm.tokenizer, inputs.client_examples[0], "local only")
    with plugged_in(llm.model, adapted.state(), adapter) as plugged:
        return inputs.evaluate(plugged, llm.tokenizer, "local only")
