"""FedProxy, server side.

    blindtune run blindtune/configs/fedproxy_wordnet_4clients_dirichlet01.yaml --out runs/fedproxy

1. Compress: measure layer/head/channel importance of the LLM on public text, keep the first, last
   and most influential layers at a reduced width, and recover the proxy by logit distillation from
   the LLM (cached; see `blindtune.models.compression`). Measure its size, its perplexity relative to
   the LLM and its zero-shot accuracy (what a client could do with the proxy alone: lower is safer).
2. Hand the proxy (never the LLM) to every client once; clients fine-tune all its decoder layers
   (LoRA or full weights) on their private data.
3. Each round: send the global proxy adapter, collect the clients' adapters, screen and aggregate them
   with the configured strategy (`ties` resolves conflicting updates; `fedavg` averages), checkpoint.
4. Plug-in without training: the aggregated proxy update (proxy with the global adapter merged, minus
   the initial proxy) is scattered onto the LLM's source layers and original head/channel indices;
   the LLM is evaluated with it (`plugin`) and the tuned proxy alone (`proxy`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import nn

from blindtune.eval.leakage import cpl, perplexities
from blindtune.federation.adapter_rounds import RoundSettings, hand_out, run_rounds
from blindtune.federation.strategies import configured_strategy
from blindtune.methods.base import BaselineInputs, ServerResult, ServerRun
from blindtune.methods.fedproxy.config import FedProxyConfig
from blindtune.models import load_model
from blindtune.models.adapters import AdapterState, attach_adapter, plugged_in, untrained_adapter_state
from blindtune.models.compression import (
    PreparedProxy,
    decoder_parameters,
    plugged_in_update,
    prepare_proxy,
    proxy_layer_state,
    proxy_update,
)
from blindtune.models.distill import public_texts
from blindtune.models.loading import LoadedModel

if TYPE_CHECKING:
    from blindtune.config import RunConfig


def handed_out_proxy(llm: LoadedModel, config: RunConfig, progress: bool) -> PreparedProxy:
    """The proxy clients receive: compressed from the LLM and recovered on the server's public text."""
    method: FedProxyConfig = config.method_config
    texts = public_texts(method.public_text, config.task, config.seed)
    return prepare_proxy(
        llm.model,
        llm.tokenizer,
        texts.train,
        method.compression,
        seed=config.seed,
        cache=method.cache_proxy,
        progress=progress,
    )


def proxy_layer_map(prepared: PreparedProxy) -> dict[int, int]:
    """Every proxy layer is trained; adapter names use proxy positions (only the plan maps them to the LLM)."""
    return {position: position for position in range(prepared.plan.num_proxy_layers)}


def proxy_report(llm: LoadedModel, prepared: PreparedProxy, heldout: list[str], max_length: int) -> dict[str, Any]:
    """Size of the proxy and its perplexity relative to the LLM on held-out public text."""
    plan = prepared.plan
    proxy_parameters = sum(p.numel() for p in prepared.model.parameters())
    llm_parameters = sum(p.numel() for p in llm.model.parameters())
    ppl = perplexities(llm.model, prepared.model, llm.tokenizer, heldout, max_length=max_length)
    return {
        "parameters": proxy_parameters,
        "llm_parameters": llm_parameters,
        "fraction_of_parameters": proxy_parameters / llm_parameters,
        "fraction_of_decoder": decoder_parameters(prepared.model) / decoder_parameters(llm.model),
        "kept_layers": list(plan.kept_layers),
        "query_heads_per_layer": len(plan.query_heads[0]),
        "kv_heads_per_layer": len(plan.kv_heads[0]),
        "mlp_channels_per_layer": len(plan.mlp_channels[0]),
        "proxy_ppl": ppl["emulator_ppl"],
        "llm_ppl": ppl["llm_ppl"],
        "ppl_ratio": ppl["ppl_ratio"],
        "distilled": bool(prepared.history) or prepared.from_cache,
        "from_cache": prepared.from_cache,
    }


@contextmanager
def plugged_llm(config: RunConfig, llm: LoadedModel, state: AdapterState) -> Iterator[nn.Module]:
    """The LLM with a global adapter plugged in as the server does: the adapter tunes the (cached) proxy,
    and the proxy's weight update is scattered onto the LLM (for the audits, after the run)."""
    method: FedProxyConfig = config.method_config
    prepared = handed_out_proxy(llm, config, progress=False)
    initial_weights = proxy_layer_state(prepared.model)
    strategy = configured_strategy(config.federation, method.adapter)
    with strategy.plugged_in(prepared.model, state) as tuned_proxy:
        update = proxy_update(tuned_proxy, initial_weights)
    with plugged_in_update(llm.model, prepared.plan, update) as plugged:
        yield plugged


def run_server(run: ServerRun) -> ServerResult:
    config = run.config
    method: FedProxyConfig = config.method_config
    llm = load_model(config.model)
    task = config.load_task()
    evaluate = config.eval.evaluator(task, run.progress)

    prepared = handed_out_proxy(llm, config, run.progress)
    proxy = LoadedModel(prepared.model, llm.tokenizer, "proxy")
    heldout = public_texts(method.public_text, config.task, config.seed).heldout
    report = proxy_report(llm, prepared, heldout, method.ppl_max_length)
    metrics = {
        "llm_zero_shot": evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True),
        "emulator_zero_shot": evaluate(proxy.model, llm.tokenizer, "proxy zero-shot"),
    }
    report["zero_shot"] = metrics["emulator_zero_shot"]
    report["cpl"] = cpl(metrics["emulator_zero_shot"], metrics["llm_zero_shot"])
    layer_map = proxy_layer_map(prepared)
    initial = untrained_adapter_state(copy.deepcopy(proxy.model), layer_map, method.adapter, config.seed)
    hand_out(run.exchange, proxy, layer_map, config.federation.required_replies)

    initial_weights = proxy_layer_state(proxy.model)
    proxy_accuracy: dict[int, float] = {}

    def evaluate_plugin(tuned_proxy: nn.Module, round_number: int) -> float:
        # The strategy has merged the global adapter into the server's proxy: what changed is the update.
        update = proxy_update(tuned_proxy, initial_weights)
        scorer = evaluate.in_round(round_number, config.federation.rounds)
        proxy_accuracy[round_number] = scorer(tuned_proxy, llm.tokenizer, f"proxy round {round_number}")
        with plugged_in_update(llm.model, prepared.plan, update) as plugged:
            return scorer(plugged, llm.tokenizer, f"plug-in round {round_number}")

    settings = RoundSettings.of_run(config, run.out_dir / "checkpoints", run.resume)
    strategy = configured_strategy(config.federation, method.adapter)
    outcome = run_rounds(run.exchange, initial, settings, strategy, proxy.model, evaluate_plugin)
    for row in outcome.history:
        if row["round"] in proxy_accuracy:
            row["proxy"] = proxy_accuracy[row["round"]]
    metrics["plugin"] = outcome.history[-1]["plugin"]
    if "proxy" not in outcome.history[-1]:  # a resumed run whose last round was evaluated before
        with strategy.plugged_in(proxy.model, outcome.state) as tuned:
            outcome.history[-1]["proxy"] = evaluate(tuned, llm.tokenizer, "proxy")
    metrics["proxy"] = outcome.history[-1]["proxy"]
    metrics["cpl"] = report["cpl"]
    metrics["ppl_ratio"] = report["ppl_ratio"]
    return ServerResult(metrics, outcome.history, outcome.clients, details={"proxy": report})


def local_only_plugin(inputs: BaselineInputs) -> float:
    """Lower bound: client 0 fine-tunes the proxy alone (same budget); its update is plugged into the LLM."""
    config = inputs.config
    method: FedProxyConfig = config.method_config
    llm = load_model(config.model)
    prepared = handed_out_proxy(llm, config, inputs.progress)
    initial_weights = proxy_layer_state(prepared.model)
    adapted = attach_adapter(copy.deepcopy(prepared.model), proxy_layer_map(prepared), method.adapter, seed=config.seed)
    inputs.train_reference(
        adapted.model, llm.tokenizer, inputs.client_examples[0], "local only", inputs.client_budget()
    )
    state = {name: p.detach().cpu() for name, p in adapted.named_adapter_parameters(include_frozen=True).items()}
    with plugged_in(prepared.model, state, method.adapter) as tuned:
        update = proxy_update(tuned, initial_weights)
    with plugged_in_update(llm.model, prepared.plan, update) as plugged:
        return inputs.evaluate(plugged, llm.tokenizer, "local only")
