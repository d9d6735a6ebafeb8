"""What a method is: a config section, a server side, a client side and its reference baselines.

A method never reaches into another method's module; what two methods share lives in the core
(`blindtune.models`, `.data`, `.training`, `.federation`, `.eval`). What its two sides get and
return (`ServerRun`, `ClientRun`, `ServerResult`) is the federation's (`blindtune.federation.apps`).
"""

from __future__ import annotations

import abc
import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import RecordDict
from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example, TaskData, TaskKind
from blindtune.federation.apps import ClientRun, ServerResult, ServerRun
from blindtune.federation.records import MessageKind
from blindtune.federation.strategies import configured_strategy
from blindtune.models.adapters import AdapterConfig, AdapterState
from blindtune.models.loading import LoadedModel
from blindtune.training import TrainConfig, train

if TYPE_CHECKING:
    from blindtune.config import RunConfig

__all__ = ["BaselineInputs", "ClientRun", "Method", "ServerResult", "ServerRun"]


@dataclass
class BaselineInputs:
    """The experimenter's view for reference rows: all clients' data (never available to the server)."""

    config: RunConfig
    task: TaskData
    client_examples: list[list[Example]]
    progress: bool = True

    def pooled_examples(self) -> list[Example]:
        return [example for examples in self.client_examples for example in examples]

    def same_budget(self) -> TrainConfig:
        """Train settings that see as many examples as the whole federation did (the centralised row)."""
        federation = self.config.federation
        return dataclasses.replace(
            self.config.train, steps=self.config.train.steps * federation.rounds * federation.num_clients
        )

    def client_budget(self) -> TrainConfig:
        """Train settings of one federated client over the whole run, rounds x steps (the local-only
        row: a client that stays alone spends the compute it would spend in the federation)."""
        return dataclasses.replace(self.config.train, steps=self.config.train.steps * self.config.federation.rounds)

    def train_reference(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: list[Example],
        desc: str,
        budget: TrainConfig,
    ) -> None:
        """Train a reference row's model on `examples` for `budget`."""
        train(model, tokenizer, examples, budget, seed=self.config.seed, progress=self.progress, desc=desc)

    def evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, desc: str) -> float:
        """Accuracy on the same test examples the federation's server evaluates on."""
        return self.config.eval.evaluator(self.task, self.progress)(model, tokenizer, desc)


class Method(abc.ABC):
    """A federated adaptation method: its name, its config section's dataclass, its two sides and
    its reference rows. The class attributes below are defaults a method may override."""

    name: str
    config_class: type[Any]
    # The task kinds it runs (the benchmark suite runs it on these).
    task_kinds: tuple[TaskKind, ...] = (TaskKind.MULTIPLE_CHOICE,)
    # What its `plugin` metric is.
    result_name: str = "plug-in"
    # Reply records whose texts the ledger check counts as privatised (and still checks for raw text).
    privatised_text_records: tuple[str, ...] = ()

    @abc.abstractmethod
    def server(self, run: ServerRun) -> ServerResult:
        """Run the federation; return its results for results.json."""

    @abc.abstractmethod
    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        """Answer one server message."""

    @abc.abstractmethod
    def centralized(self, inputs: BaselineInputs) -> float:
        """Upper bound: accuracy of the adapted LLM trained on the pooled data, same budget."""

    @abc.abstractmethod
    def local_only(self, inputs: BaselineInputs) -> float:
        """Lower bound: accuracy when client 0 adapts alone, same budget."""

    def client_adapter(self, config: RunConfig) -> AdapterConfig | None:
        """The adapter clients train on the handed-out artefact, aggregated by the run's strategy
        (None: none the round loop's strategies know)."""
        return None

    def plugged_llm(
        self, config: RunConfig, llm: LoadedModel, state: AdapterState
    ) -> AbstractContextManager[nn.Module] | None:
        """The LLM with a final adapter `state` plugged in, as the run's server does (the audits use
        it); None when the method plugs nothing into the LLM. By default the strategy plugs the
        client adapter in as is."""
        adapter = self.client_adapter(config)
        if adapter is None:
            return None
        return configured_strategy(config.federation, adapter).plugged_in(llm.model, state)
