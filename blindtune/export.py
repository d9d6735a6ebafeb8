"""Take the adapted model home: a run's final (or chosen) checkpoint as standard Hugging Face / PEFT dirs.

    blindtune export runs/demo --out exported [--round N] [--party client-0]

- OUT/merged/: the adapted model with the adapter written into its weights (`save_pretrained` of model
  and tokenizer, safetensors): `AutoModelForCausalLM.from_pretrained("OUT/merged")`.
- OUT/adapter/: a PEFT adapter (LoRA; prompt tuning for a soft prompt), built with peft's own classes
  (`get_peft_model` on the base, the run's weights loaded under PEFT's names, `save_pretrained`):
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "OUT/adapter")`.
  Its `base_model_name_or_path` is the run's model directory when the run named one; when the run used
  the embedded default model (a GGUF dequantised into the user cache) or a model derived from the LLM
  (FedCoT's client SLM), that base is written to OUT/base, so the export stands alone.
- a README.md model card in each: method, task, rounds, clients, the run's accuracy rows, its privacy row.

What each method yields:
- offsite, LLEOT: LoRA -> merged + adapter; full adapter layers -> merged only (a layer replacement is
  no PEFT adapter); soft prompt -> adapter only (prompt tuning; a prompt has no weights to merge into).
  FLoRA's stacked global state is a LoRA of the stacked rank with scale 1 (alpha = rank).
- FedProxy: merged only (the LLM gets the tuned proxy's weight update scattered back, not a LoRA).
- FedMKT: the LLM's LoRA -> merged + adapter.
- FedCoT: `--party client-N` -> the client SLM with the federated LoRA (every client holds the same
  global adapter), merged + adapter on OUT/base (the SLM).

A run that crashed exports its last complete round (checkpoints are written only for finished rounds).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model
from torch import nn

from blindtune.config import RunConfig
from blindtune.federation.checkpoint import complete_rounds, load_checkpoint
from blindtune.federation.strategies import FLoRA, configured_strategy
from blindtune.methods import get_method, run_config_from_dict
from blindtune.models.adapters import AdapterConfig, AdapterKind, AdapterState, check_compatible, plugged_in
from blindtune.models.loading import DEFAULT_MODEL, LoadedModel, load_model, resolve_model_dir
from blindtune.models.soft_prompt import SOFT_PROMPT_NAME
from blindtune.models.surgery import canonical_name, decoder_layers, split_canonical_name

MERGED = "merged"
ADAPTER = "adapter"
BASE = "base"
_CLIENT_PARTY = re.compile(r"client-(\d+)")


class ExportError(ValueError):
    """The run cannot be exported as asked (the message says why)."""


@dataclass
class ExportTarget:
    """The model an adapter state belongs to and how the run plugged it in."""

    party: str  # "server LLM" or "client-N SLM"
    base: LoadedModel
    base_dir: Path | None  # an existing HF directory holding `base`; None: written to OUT/base
    adapter: AdapterConfig | None  # None: no PEFT form (merged only)
    lora_scale: float | None  # B @ A's multiplier when it is not alpha / r (FLoRA's stack: 1.0)
    plugged: Callable[[AdapterState], AbstractContextManager[nn.Module]]


@dataclass
class Exported:
    round: int
    rounds: int
    merged: Path | None = None
    adapter: Path | None = None
    base: Path | None = None
    notes: list[str] = field(default_factory=list)


def run_config_of(run_dir: Path) -> RunConfig:
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{run_dir} is not a run directory: no config.json")
    return run_config_from_dict(json.loads(config_file.read_text()))


def chosen_checkpoint(run_dir: Path, round_number: int | None) -> tuple[int, AdapterState, dict[str, Any]]:
    """The last complete round's checkpoint, or round `round_number`'s."""
    root = run_dir / "checkpoints"
    rounds = complete_rounds(root)
    if not rounds:
        raise ExportError(f"no complete checkpoint under {root}: the run finished no round")
    if round_number is None:
        round_number = rounds[-1]
    if round_number not in rounds:
        raise ExportError(f"round {round_number} has no complete checkpoint under {root}; complete rounds: {rounds}")
    return load_checkpoint(root, round_number)


def export_target(config: RunConfig, party: str | None) -> ExportTarget:
    """What the exported model is for this run's method and the asked party."""
    method = config.method_config
    if config.method == "fedcot":
        match = _CLIENT_PARTY.fullmatch(party or "")
        if match is None or int(match.group(1)) >= config.federation.num_clients:
            raise ExportError(
                f"fedcot adapts the clients' SLM, not the LLM: pass --party client-N "
                f"(N < {config.federation.num_clients})"
            )
        from blindtune.methods.fedcot.server import build_slm

        slm = build_slm(load_model(config.model), config, progress=False)
        return _strategy_target(config, f"{party} SLM", slm, None, method.adapter)
    if party not in (None, "server"):
        raise ExportError(f"{config.method} adapts the server's LLM: --party {party} does not apply")
    llm = load_model(config.model)
    base_dir = None if config.model in ("", DEFAULT_MODEL) else resolve_model_dir(config.model).resolve()
    if config.method == "fedmkt":
        adapter = method.llm_adapter
        return ExportTarget(
            "server LLM", llm, base_dir, adapter, None, lambda state: plugged_in(llm.model, state, adapter)
        )
    if config.method == "fedproxy":  # the proxy's update scattered onto the LLM: no PEFT form of it
        from blindtune.methods.fedproxy.server import plugged_llm

        return ExportTarget("server LLM", llm, base_dir, None, None, lambda state: plugged_llm(config, llm, state))
    adapter = get_method(config.method).client_adapter(config)
    if adapter is None:
        raise ExportError(f"method {config.method!r} has no adapter to export")
    return _strategy_target(config, "server LLM", llm, base_dir, adapter)


def _strategy_target(
    config: RunConfig, party: str, base: LoadedModel, base_dir: Path | None, adapter: AdapterConfig
) -> ExportTarget:
    strategy = configured_strategy(config.federation, adapter)
    lora_scale = 1.0 if isinstance(strategy, FLoRA) else None
    peft_form = adapter if adapter.kind is not AdapterKind.LAYERS else None
    return ExportTarget(
        party, base, base_dir, peft_form, lora_scale, lambda state: strategy.plugged_in(base.model, state)
    )


def export_run(run_dir: Path, out: Path, round_number: int | None = None, party: str | None = None) -> Exported:
    """Write OUT/merged, OUT/adapter (and OUT/base when needed) from a run's checkpoint; see the module doc."""
    config = run_config_of(run_dir)
    chosen, state, meta = chosen_checkpoint(run_dir, round_number)
    target = export_target(config, party)
    exported = Exported(round=chosen, rounds=config.federation.rounds)
    tokenizer = target.base.tokenizer
    if target.adapter is None or target.adapter.kind is not AdapterKind.SOFT_PROMPT:
        with target.plugged(state) as plugged:
            exported.merged = out / MERGED
            plugged.save_pretrained(exported.merged, safe_serialization=True)  # type: ignore[operator]
            tokenizer.save_pretrained(exported.merged)
    else:
        exported.notes.append("no merged model: a soft prompt has no weights to merge into (see adapter/)")
    if target.adapter is not None:
        base_dir = target.base_dir
        if base_dir is None:
            base_dir = (out / BASE).resolve()
            target.base.model.save_pretrained(base_dir, safe_serialization=True)
            tokenizer.save_pretrained(base_dir)
            exported.base = base_dir
        exported.adapter = out / ADAPTER
        peft_model = peft_adapter_model(target.base.model, state, target.adapter, target.lora_scale)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
        peft_model.save_pretrained(str(exported.adapter))
        _unwrap(peft_model)
    else:
        exported.notes.append(f"no PEFT adapter: {_why_merged_only(config)}")
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    command = ["blindtune", "export", str(run_dir), "--out", str(out)]
    command += ["--round", str(round_number)] if round_number is not None else []
    command += ["--party", party] if party else []
    rerun = shlex.join(["blindtune", "run", str(run_dir / "config.json"), "--out", str(run_dir)])
    card = model_card(config, target.party, exported, meta, results, f"`{rerun}`, then `{shlex.join(command)}`")
    for directory in (exported.merged, exported.adapter):
        if directory is not None:
            (directory / "README.md").write_text(card, encoding="utf-8")
    return exported


def _why_merged_only(config: RunConfig) -> str:
    if config.method == "fedproxy":
        return "FedProxy's LLM update is the tuned proxy's weight change scattered back, not a LoRA"
    return "full adapter layers replace the LLM's layers; only the merged model carries them"


def peft_adapter_model(
    base: nn.Module, state: AdapterState, adapter: AdapterConfig, lora_scale: float | None = None
) -> PeftModel:
    """`base` wrapped by peft with the run's adapter state loaded under PEFT's parameter names."""
    if adapter.kind is AdapterKind.SOFT_PROMPT:
        return _prompt_tuning_model(base, state)
    if adapter.kind is not AdapterKind.LORA:
        raise ExportError(f"a {adapter.kind} adapter has no PEFT form")
    ranks = {tensor.shape[0] for name, tensor in state.items() if ".lora_A." in name}
    if len(ranks) != 1:
        raise ExportError(f"LoRA modules of different ranks {sorted(ranks)}: export the merged model only")
    (rank,) = ranks
    scale = adapter.lora_alpha / rank if lora_scale is None else lora_scale
    modules = {split_canonical_name(name)[1].split(".lora_A.")[0] for name in state if ".lora_A." in name}
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=scale * rank,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=0.0,
        target_modules=sorted({module.rsplit(".", 1)[-1] for module in modules}),
        layers_to_transform=sorted({split_canonical_name(name)[0] for name in state}),
        layers_pattern="layers",
    )
    model = get_peft_model(base, lora)
    identity = {index: index for index in range(len(decoder_layers(base)))}
    own = {}
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            canonical = canonical_name(name.replace(".default.", "."), identity)
            assert canonical is not None, name
            own[canonical] = parameter
    check_compatible(state, {name: tuple(p.shape) for name, p in own.items()})
    with torch.no_grad():
        for name, parameter in own.items():
            parameter.copy_(state[name])
    return model


def _prompt_tuning_model(base: nn.Module, state: AdapterState) -> PeftModel:
    prompt = state.get(SOFT_PROMPT_NAME)
    if prompt is None or set(state) != {SOFT_PROMPT_NAME}:
        raise ExportError(f"a soft-prompt adapter holds exactly {SOFT_PROMPT_NAME!r}, got {sorted(state)}")
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.shape[0])
    model = get_peft_model(base, config)
    encoder: Any = model.prompt_encoder["default"]
    embedding: torch.Tensor = encoder.embedding.weight
    if embedding.shape != prompt.shape:
        raise ExportError(f"{SOFT_PROMPT_NAME}: shape {tuple(prompt.shape)} != {tuple(embedding.shape)}")
    with torch.no_grad():
        embedding.copy_(prompt)
    return model


def _unwrap(model: PeftModel) -> None:
    """Take the peft modules off the base again (it stays usable by the caller)."""
    if isinstance(model.peft_config["default"], LoraConfig):
        model.unload()


# ---- model card ----------------------------------------------------------------------------------


def _percent(value: Any) -> str:
    return "-" if not isinstance(value, int | float) or not math.isfinite(value) else f"{100 * value:.1f}%"


def _epsilon(section: dict[str, Any]) -> str:
    if not section.get("enabled"):
        return "off"
    epsilon, delta = section.get("epsilon"), section.get("delta")
    return f"ε = {'∞' if epsilon is None else f'{epsilon:.3g}'} (δ = {delta if delta is not None else '-'})"


def _nll(value: Any) -> str:
    return "-" if not isinstance(value, int | float) or not math.isfinite(value) else f"{value:.4f}"


def _scores_responses(config: RunConfig, results: dict[str, Any] | None) -> bool:
    """Whether the run's figures are response NLLs (instruction data) rather than accuracies."""
    if results is not None and "metric" in results:
        return bool(results["metric"] == "response_nll")
    from blindtune.data import TaskKind  # a crashed run (or one from before `metric`): ask the task

    return config.load_task().kind is TaskKind.INSTRUCTION


def privacy_line(privacy: dict[str, Any] | None) -> str:
    if not privacy:
        return "not recorded (the run has no results.json)"
    ledger = privacy.get("ledger")
    if ledger is None:
        ledger_text = "not checked"
    elif ledger.get("passed"):
        ledger_text = "passed (no raw client text left a client)"
    else:
        ledger_text = f"{ledger.get('raw_text_leaks')} raw-text leaks"
    return (
        f"client DP-SGD {_epsilon(privacy.get('dp', {}))}; server DP {_epsilon(privacy.get('server_dp', {}))}; "
        f"SecAgg+ {'on' if privacy.get('secagg', {}).get('enabled') else 'off'}; ledger {ledger_text}"
    )


def model_card(
    config: RunConfig,
    party: str,
    exported: Exported,
    meta: dict[str, Any],
    results: dict[str, Any] | None,
    command: str,
) -> str:
    complete = results is not None and exported.round == exported.rounds
    status = "" if complete else " (the run did not finish or another round was chosen: this is that round's state)"
    metrics = results.get("metrics", {}) if results else {}
    nll = _scores_responses(config, results)
    shown = _nll if nll else _percent
    rows = [f"| {name} | {shown(value)} |" for name, value in metrics.items() if isinstance(value, int | float)]
    history = [f"| round {row['round']} plug-in | {shown(row.get('plugin'))} |" for row in meta.get("history", [])]
    evaluate = f"blindtune eval --model {exported.merged} --task {config.task}"
    if config.data_dir:
        evaluate += f" --data-dir {config.data_dir}"
    if config.eval.limit is not None:
        evaluate += f" --limit {config.eval.limit}"
    evaluate += f" --batch-size {config.eval.batch_size}"
    if config.eval.length_normalized:
        evaluate += " --length-normalized"
    lines = [
        f"# {config.method} on {config.task}: the {party}, adapted (exported by blindtune)",
        "",
        f"- method: {config.method}",
        f"- task: {config.task}",
        f"- rounds: round {exported.round} of {exported.rounds}{status}",
        f"- clients: {config.federation.num_clients}",
        f"- base model: {config.model}" + (f" (saved in {exported.base})" if exported.base else ""),
        f"- privacy: {privacy_line(results.get('privacy') if results else None)}",
        f"- made by: {command}",
        *(f"- note: {note}" for note in exported.notes),
        "",
        f"| row | {'test response NLL (nats per token, lower is better)' if nll else 'accuracy'} |",
        "|---|---|",
        *rows,
        *history,
        "",
    ]
    if exported.merged is not None and party == "server LLM":
        lines += ["Reproduce the plug-in row on the same test examples:", "", f"    {evaluate}", ""]
    lines += [
        "Load with plain transformers / peft:",
        "",
        "    from transformers import AutoModelForCausalLM, AutoTokenizer",
    ]
    if exported.merged is not None:
        lines.append(f'    model = AutoModelForCausalLM.from_pretrained("{exported.merged}")')
    if exported.adapter is not None:
        lines += [
            "    from peft import PeftModel",
            f'    base = AutoModelForCausalLM.from_pretrained("{exported.base or config.model}")',
            f'    model = PeftModel.from_pretrained(base, "{exported.adapter}")',
        ]
    return "\n".join(lines) + "\n"
