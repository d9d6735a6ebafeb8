"""LLEOT: offsite tuning with a loss-elevated emulator (see `blindtune.methods.lleot.server`).

Clients are offsite tuning's: they train the adapter (a soft prompt by default) on the emulator they
were handed; only the server's preparation of that emulator differs.
"""

from __future__ import annotations

from flwr.app import RecordDict

from blindtune.config import RunConfig
from blindtune.federation.records import MessageKind
from blindtune.methods import register_method
from blindtune.methods.adapter_tuning import answer_client, centralized_adapter, local_only_adapter
from blindtune.methods.base import BaselineInputs, ClientRun, Method, ServerResult, ServerRun
from blindtune.methods.lleot.config import LleotConfig
from blindtune.methods.lleot.server import elevated_emulator, emulator_plan, run_server
from blindtune.models import load_model
from blindtune.models.adapters import AdapterConfig
from blindtune.models.surgery import adapter_layer_map


class Lleot(Method):
    name = "lleot"
    config_class = LleotConfig

    def server(self, run: ServerRun) -> ServerResult:
        return run_server(run)

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        return answer_client(kind, content, run, run.config.method_config.adapter)

    def client_adapter(self, config: RunConfig) -> AdapterConfig:
        return config.method_config.adapter

    def centralized(self, inputs: BaselineInputs) -> float:
        """The same adapter trained directly on the full LLM with the pooled client data."""
        method: LleotConfig = inputs.config.method_config
        llm = load_model(inputs.config.model)
        layers = tuple(adapter_layer_map(emulator_plan(llm, method), method.train_top_layers).values())
        return centralized_adapter(inputs, llm, layers, method.adapter)

    def local_only(self, inputs: BaselineInputs) -> float:
        """Client 0 trains the adapter on the elevated emulator with only its own data; plugged into the LLM."""
        config = inputs.config
        method: LleotConfig = config.method_config
        llm = load_model(config.model)
        plan = emulator_plan(llm, method)
        prepared = elevated_emulator(llm, plan, method, config.task, config.seed, inputs.progress)
        return local_only_adapter(
            inputs, llm, prepared.model, adapter_layer_map(plan, method.train_top_layers), method.adapter
        )


register_method(Lleot())
