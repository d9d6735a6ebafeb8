"""FedCoT (Fan et al., Findings of EMNLP 2025): clients privatise their prompts with the exponential
mechanism, the server LLM returns a rationale for each, and clients train their SLM on labels and
rationales (see `blindtune.methods.fedcot.server` and `.client`)."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager

from flwr.app import RecordDict
from torch import nn

from blindtune.config import RunConfig
from blindtune.data import Example, TaskKind
from blindtune.federation.records import MessageKind
from blindtune.methods import register_method
from blindtune.methods.base import BaselineInputs, ClientRun, Method, ServerResult, ServerRun
from blindtune.methods.fedcot.client import answer_client
from blindtune.methods.fedcot.config import FedCoTConfig, RationaleSource
from blindtune.methods.fedcot.rationales import (
    generate_rationales,
    label_example,
    label_task,
    oracle_rationale,
    rationale_examples,
    rationale_template,
)
from blindtune.methods.fedcot.server import PRIVATISED_RECORDS, build_slm, every_layer, run_server
from blindtune.models import load_model
from blindtune.models.adapters import AdapterConfig, AdapterState, attach_adapter
from blindtune.models.loading import LoadedModel
from blindtune.training import TrainConfig, train
from blindtune.training.loop import AuxiliaryTask


class FedCoT(Method):
    name = "fedcot"
    config_class = FedCoTConfig
    # The ledger check counts texts in these reply records as privatised (and still checks them for raw text).
    privatised_text_records = PRIVATISED_RECORDS
    # Rationales help generation tasks (GSM8K) most; the benchmark suite runs FedCoT on both kinds.
    task_kinds = (TaskKind.MULTIPLE_CHOICE, TaskKind.GENERATION)
    # metrics.plugin is the client SLM's accuracy: FedCoT plugs nothing into the LLM.
    result_name = "client SLM"

    def server(self, run: ServerRun) -> ServerResult:
        return run_server(run)

    def client(self, kind: MessageKind, content: RecordDict, run: ClientRun) -> RecordDict:
        return answer_client(kind, content, run)

    def client_adapter(self, config: RunConfig) -> AdapterConfig:
        """The LoRA clients train on the SLM the server hands out."""
        return config.method_config.adapter

    def plugged_llm(
        self, config: RunConfig, llm: LoadedModel, state: AdapterState
    ) -> AbstractContextManager[nn.Module] | None:
        """None: FedCoT's adapter belongs to the SLM; nothing is plugged into the LLM."""
        return None

    def centralized(self, inputs: BaselineInputs) -> float:
        """Upper bound: the SLM trained on the pooled data with the LLM's rationales for the raw
        (not privatised) prompts (or the oracle ones), same budget, no federation."""
        config = inputs.config
        method: FedCoTConfig = config.method_config
        llm = load_model(config.model)
        slm = build_slm(llm, config, inputs.progress)
        examples = [e for client in inputs.client_examples for e in client[: method.prompts_per_client]]
        if method.rationale_source is RationaleSource.ORACLE:
            rationales = [oracle_rationale(example) for example in examples]
        else:
            template = rationale_template(method, inputs.task)
            prompts = [example.prompt for example in examples]
            rationales = generate_rationales(llm.model, llm.tokenizer, prompts, template, method, inputs.progress)
        auxiliary = rationale_examples(examples, rationales, method)[0]
        return _train_slm(inputs, slm, inputs.pooled_examples(), auxiliary, "centralized", inputs.same_budget())

    def local_only(self, inputs: BaselineInputs) -> float:
        """Lower bound: client 0 trains its SLM on its own labels alone (no rationales, no federation),
        with one federated client's compute."""
        slm = build_slm(load_model(inputs.config.model), inputs.config, inputs.progress)
        return _train_slm(inputs, slm, inputs.client_examples[0], [], "local only", inputs.client_budget())


def _train_slm(
    inputs: BaselineInputs,
    slm: LoadedModel,
    examples: list[Example],
    rationales: list[Example],
    desc: str,
    budget: TrainConfig,
) -> float:
    config = inputs.config
    method: FedCoTConfig = config.method_config
    adapted = attach_adapter(copy.deepcopy(slm.model), every_layer(slm.model), method.adapter, seed=config.seed)
    auxiliary = AuxiliaryTask(rationales, method.rationale_weight) if rationales and method.rationale_weight else None
    train(
        adapted.model,
        slm.tokenizer,
        [label_example(example, method, slm.tokenizer.eos_token or "") for example in examples],
        budget,
        seed=config.seed,
        progress=inputs.progress,
        desc=desc,
        auxiliary=auxiliary,
    )
    return config.eval.evaluator(label_task(inputs.task, method), inputs.progress)(adapted.model, slm.tokenizer, desc)


register_method(FedCoT())
