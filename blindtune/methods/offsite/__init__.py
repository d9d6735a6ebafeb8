"""Offsite tuning (Xiao et al., 2023): clients adapt the bottom/top layers on a layer-dropped emulator."""

from __future__ import annotations

import dataclasses

from flwr.app import RecordDict

from blindtune.federation.adapter_rounds import store_artefact, train_round
from blindtune.federation.records import MessageKind
from blindtune.federation.strategies import build_strategy
from blindtune.methods import register_method
from blindtune.methods.base import BaselineInputs, ClientRun, ServerRun
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.methods.offsite.server import adapter_layer_map, emulator_plan, run_server
from blindtune.models import load_model
from blindtune.models.adapters import attach_adapter, plugged_in
from blindtune.models.surgery import build_emulator
from blindtune.training import train


class OffsiteTuning:
    name = "offsite"
    config_class = OffsiteConfig

    def server(self, run: ServerRun) -> dict[str, object]:
        return run_server(run)

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        if kind is MessageKind.SETUP:
            return store_artefact(content, run.workdir)
        method: OffsiteConfig = run.config.method_config
        federation = run.config.federation
        strategy = build_strategy(federation.strategy, method.adapter, federation.proximal_mu)
        train_config = dataclasses.replace(
            run.config.train, batch_size=federation.client_batch_size(run.partition_id, run.config.train.batch_size)
        )
        return train_round(
            content,
            run.workdir,
            run.examples,
            strategy,
            train_config,
            run.partition_id,
            federation.client_rank(run.partition_id),
        )

    def centralized(self, inputs: BaselineInputs) -> float:
        """The same adapter layers trained directly on the full LLM with the pooled client data."""
        config = inputs.config
        llm = load_model(config.model)
        plan = emulator_plan(llm, config.method_config)
        adapted = attach_adapter(llm.model, {i: i for i in plan.adapter_layers}, config.method_config.adapter)
        train(
            adapted.model,
            llm.tokenizer,
            inputs.pooled_examples(),
            inputs.same_budget(),
            seed=config.seed,
            progress=inputs.progress,
            desc="centralized",
        )
        return inputs.evaluate(adapted.model, llm.tokenizer, "centralized")

    def local_only(self, inputs: BaselineInputs) -> float:
        """Client 0 trains the adapter on the emulator with only its own data; plugged into the LLM."""
        config = inputs.config
        llm = load_model(config.model)
        plan = emulator_plan(llm, config.method_config)
        emulator = build_emulator(llm.model, plan)
        adapted = attach_adapter(emulator, adapter_layer_map(plan), config.method_config.adapter)
        train(
            adapted.model,
            llm.tokenizer,
            inputs.client_examples[0],
            inputs.same_budget(),
            seed=config.seed,
            progress=inputs.progress,
            desc="local only",
        )
        with plugged_in(llm.model, adapted.state(), config.method_config.adapter) as plugged:
            return inputs.evaluate(plugged, llm.tokenizer, "local only")


register_method(OffsiteTuning())
