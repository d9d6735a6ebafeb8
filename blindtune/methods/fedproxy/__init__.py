"""FedProxy (Fan et al.): clients fine-tune a whole proxy small language model compressed from the LLM;
the server merges their updates without letting conflicting clients cancel out, and plugs the result
into the LLM without training (see `blindtune.methods.fedproxy.server`)."""

from __future__ import annotations

from flwr.app import RecordDict

from blindtune.federation.records import MessageKind
from blindtune.methods import register_method
from blindtune.methods.adapter_tuning import answer_client, centralized_adapter
from blindtune.methods.base import BaselineInputs, ClientRun, ServerRun
from blindtune.methods.fedproxy.config import FedProxyConfig
from blindtune.methods.fedproxy.server import local_only_plugin, plugged_llm, run_server
from blindtune.models import load_model
from blindtune.models.surgery import num_decoder_layers


class FedProxy:
    name = "fedproxy"
    config_class = FedProxyConfig

    def server(self, run: ServerRun) -> dict[str, object]:
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

    # The adapter fits the proxy, not the LLM: the audits plug it in through the proxy's update.
    plugged_llm = staticmethod(plugged_llm)


register_method(FedProxy())
