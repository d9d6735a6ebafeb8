"""FedMKT (Fan et al., COLING 2025): the server's LLM and the clients' small models teach each other
through top-K next-token distributions on a public set; only distributions on public text cross."""

from __future__ import annotations

import dataclasses

from flwr.app import RecordDict

from blindtune.federation.records import MessageKind
from blindtune.methods import register_method
from blindtune.methods.adapter_tuning import centralized_adapter
from blindtune.methods.base import BaselineInputs, ClientRun, Method, ServerResult, ServerRun
from blindtune.methods.fedmkt.client import answer, wordpiece_slm
from blindtune.methods.fedmkt.config import FedMKTConfig, SLMKind
from blindtune.methods.fedmkt.server import compressed_slm, run_server
from blindtune.models import LoadedModel, load_model
from blindtune.models.adapters import attach_adapter
from blindtune.models.surgery import num_decoder_layers
from blindtune.training import train


class FedMKT(Method):
    name = "fedmkt"
    config_class = FedMKTConfig

    def server(self, run: ServerRun) -> ServerResult:
        return run_server(run)

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        return answer(kind, content, run)

    def centralized(self, inputs: BaselineInputs) -> float:
        """The LLM's LoRA (all layers) trained on the pooled client data, same number of examples."""
        method: FedMKTConfig = inputs.config.method_config
        llm = load_model(inputs.config.model)
        return centralized_adapter(inputs, llm, tuple(range(num_decoder_layers(llm.model))), method.llm_adapter)

    def local_only(self, inputs: BaselineInputs) -> float:
        """Client 0's SLM trained on its own data alone, for as many optimiser steps as it takes in the
        federation (private training plus distillation, every round): the SLM's lower bound."""
        config = inputs.config
        method: FedMKTConfig = config.method_config
        kind = method.slm_kind(0)
        if kind is SLMKind.WORDPIECE:
            slm = wordpiece_slm(method, config.seed)
            for parameter in slm.model.parameters():
                parameter.requires_grad_(True)
            learning_rate = method.wordpiece_learning_rate
        else:
            slm = compressed_slm(load_model(config.model), config, inputs.progress)
            layers = {i: i for i in range(num_decoder_layers(slm.model))}
            adapted = attach_adapter(slm.model, layers, method.slm_adapter, seed=config.seed)
            slm = LoadedModel(adapted.model, slm.tokenizer, "compressed-slm")  # type: ignore[arg-type]
            learning_rate = config.train.learning_rate
        steps = (config.train.steps + method.client_distill_steps) * config.federation.rounds
        train(
            slm.model,
            slm.tokenizer,
            inputs.client_examples[0],
            dataclasses.replace(config.train, steps=steps, learning_rate=learning_rate),
            seed=config.seed,
            progress=inputs.progress,
            desc="local only (client 0 SLM)",
        )
        return inputs.evaluate(slm.model, slm.tokenizer, "local only")


register_method(FedMKT())
