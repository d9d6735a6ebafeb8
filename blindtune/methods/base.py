"""What a method is: a config section, a server side, a client side and its reference baselines.

A method never reaches into another method's module; what two methods share lives in the core
(`blindtune.models`, `.data`, `.training`, `.federation`, `.eval`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flwr.app import RecordDict
from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example, TaskData
from blindtune.federation.records import MessageKind
from blindtune.federation.rounds import Exchange
from blindtune.training import TrainConfig, train

if TYPE_CHECKING:
    from blindtune.config import RunConfig


@dataclass
class ServerRun:
    """What a method's server side gets: the config, the message exchange and where to write."""

    config: RunConfig
    exchange: Exchange
    out_dir: Path
    progress: bool = True
    resume: bool = False  # continue after the last complete round checkpointed in out_dir


@dataclass
class ClientRun:
    """What a method's client side gets: the config, its private examples and its local storage."""

    config: RunConfig
    partition_id: int
    examples: list[Example]
    workdir: Path


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
        """Train settings that see as many examples as the whole federation did."""
        federation = self.config.federation
        return dataclasses.replace(
            self.config.train, steps=self.config.train.steps * federation.rounds * federation.num_clients
        )

    def train_reference(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], desc: str
    ) -> None:
        """Train a reference row's model on `examples` with the whole federation's budget."""
        train(model, tokenizer, examples, self.same_budget(), seed=self.config.seed, progress=self.progress, desc=desc)

    def evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, desc: str) -> float:
        """Accuracy on the same test examples the federation's server evaluates on."""
        return self.config.eval.evaluator(self.task, self.progress)(model, tokenizer, desc)


class Method(Protocol):
    """A federated adaptation method. Optional attributes, read with defaults: `task_kinds` (the task
    kinds it runs), `result_name` (what its "plug-in" row is), and `plugged_llm(config, llm, state)`, a
    context manager giving the LLM with a final adapter plugged in, for methods whose adapter does not
    fit the LLM as is (the audits use it)."""

    name: str
    config_class: type[Any]

    def server(self, run: ServerRun) -> dict[str, Any]:
        """Run the federation; return results (metrics, history, clients) for results.json."""

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        """Answer one server message."""

    def centralized(self, inputs: BaselineInputs) -> float:
        """Upper bound: accuracy of the adapted LLM trained on the pooled data, same budget."""

    def local_only(self, inputs: BaselineInputs) -> float:
        """Lower bound: accuracy when client 0 adapts alone, same budget."""
