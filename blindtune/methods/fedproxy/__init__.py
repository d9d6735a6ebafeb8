"""FedProxy (Fan et al.): clients fine-tune a whole proxy small language model compressed from the LLM;
the server merges their updates without letting conflicting clients cancel out, and plugs the result
into the LLM without training (see `blindtune.methods.fedproxy.server`)."""

from __future__ import annotations

from contextlib import AbstractContextManager

from flwr.app import RecordDict
from torch import nn

from blindtune.config import RunConfig
from blindtune.federation.records import MessageKind
from blindtune.methods import register_method
from blindtune.methods.adapter_tuning import answer_client, centralized_adapter
from blindtune.methods.base import BaselineInputs, ClientRun, Method, ServerResult, ServerRun
from blindtune.methods.fedproxy.config import FedProxyConfig
from blindtune.methods.fedproxy.server import local_only_plugin, plugged_llm, run_server
from blindtune.models import LoadedModel, load_model
from blindtune.models.adapters import AdapterConfig, AdapterState
from blindtune.models.surgery import num_decoder_layers


class FedProxy(Method):
    name = "fedproxy"
    config_class = FedProxyConfig

    def server(self, run: ServerRun) -> ServerResult:
        return run_server(run)

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        """Clients store the proxy like any handed-out artefact and train the adapter on all its layers."""
        return answer_client(kind, content, run, run.config.method_config.adapter)

    def centralized(self, inputs: BaselineInputs) -> float:
        """The same kind of adapter trained on every layer of the full LLM with the pooled client data."""
        method: FedProxyConfig = inputs.config.method_config
        llm = load_model(inputs.config.model)
        return centralized_adapter(inputs, llm, tuple(range(num_decoder_layers(llm.model))), method.adapter)

    def local_only(self, inputs: BaselineInputs) -> float:
        """Client 0 fine-tunes the proxy with only its own data; plugged into the LLM."""
        return local_only_plugin(inputs)

    def client_adapter(self, config: RunConfig) -> AdapterConfig:
        return config.method_config.adapter

    def plugged_llm(
        self, config: RunConfig, llm: LoadedModel, state: AdapterState
    ) -> AbstractContextManager[nn.Module]:
        """The adapter fits the proxy, not the LLM: it is plugged in through the proxy's update."""
        return plugged_llm(config, llm, state)


register_method(FedProxy())
