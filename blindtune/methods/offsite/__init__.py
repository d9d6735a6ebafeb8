"""Offsite tuning (Xiao et al., 2023): clients adapt the bottom/top layers on a layer-dropped emulator."""

from __future__ import annotations

from flwr.app import RecordDict

from blindtune.config import RunConfig
from blindtune.federation.records import MessageKind
from blindtune.methods import register_method
from blindtune.methods.adapter_tuning import answer_client, centralized_adapter, local_only_adapter
from blindtune.methods.base import BaselineInputs, ClientRun, Method, ServerResult, ServerRun
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.methods.offsite.server import emulator_plan, handed_out_emulator, run_server
from blindtune.models import load_model
from blindtune.models.adapters import AdapterConfig


class OffsiteTuning(Method):
    name = "offsite"
    config_class = OffsiteConfig

    def server(self, run: ServerRun) -> ServerResult:
        return run_server(run)

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        return answer_client(kind, content, run, run.config.method_config.adapter)

    def client_adapter(self, config: RunConfig) -> AdapterConfig:
        return config.method_config.adapter

    def centralized(self, inputs: BaselineInputs) -> float:
        """The same adapter layers trained directly on the full LLM with the pooled client data."""
        method: OffsiteConfig = inputs.config.method_config
        llm = load_model(inputs.config.model)
        layers = tuple(method.trained_layers(emulator_plan(llm, method)).values())
        return centralized_adapter(inputs, llm, layers, method.adapter)

    def local_only(self, inputs: BaselineInputs) -> float:
        """Client 0 trains the adapter on the handed-out emulator with only its own data."""
        method: OffsiteConfig = inputs.config.method_config
        llm = load_model(inputs.config.model)
        plan, emulator = handed_out_emulator(llm, inputs.config, inputs.progress)
        return local_only_adapter(inputs, llm, emulator.model, method.trained_layers(plan), method.adapter)


register_method(OffsiteTuning())
