"""Which parts of an offsite run's adapter carry its gain into the LLM? Post-hoc plug-in variants.

    python -m benchmarks.plugin_parts RUN_DIR --out benchmarks/results/recipe-tasks/plugin-parts/TASK

Takes a finished `offsite` run's final global adapter and plugs variants of it into the LLM, scored
on the task's *validation* split (these are variants, not final settings):

- `as trained`: the adapter as the run plugs it in;
- `without the parts on zeroed channels`: the hand-out zeroes most middle MLP channels, so clients
  never train the LoRA parts that only act through them (the columns of the down-projection's A that
  read them, the rows of the gate/up-projections' B that write them); in the LLM those channels are
  alive and the untrained parts act on them. This variant zeroes those parts;
- the end layers only, the middle layers only, attention only, MLP only;
- the LoRA product scaled by 0.5, 1.5 and 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blindtune.audits.audit import final_adapter
from blindtune.config import EvalConfig, RunConfig
from blindtune.data import load_task
from blindtune.methods import run_config_from_dict
from blindtune.methods.offsite.config import OffsiteConfig
from blindtune.methods.offsite.server import handed_out_emulator
from blindtune.models import load_model
from blindtune.models.adapters import plugged_in
from blindtune.models.compact import compacted
from blindtune.models.surgery import decoder_layers, split_canonical_name

AdapterState = dict[str, torch.Tensor]


def without_zeroed_channel_parts(state: AdapterState, handout: torch.nn.Module) -> AdapterState:
    """`state` with its LoRA parts that act only through the MLP channels the hand-out zeroes set to 0:
    cut to the compact hand-out's channels and back, with nothing to refill the dropped entries from."""
    _, channels = compacted(handout)
    identity = {index: index for index in range(len(decoder_layers(handout)))}  # a full-depth hand-out
    return channels.full_state(channels.compact_state(state, identity), {}, identity)


def variants(state: AdapterState, handout: torch.nn.Module, config: RunConfig) -> dict[str, tuple[AdapterState, float]]:
    """Name -> (adapter state, scale of the LoRA product relative to the run's alpha / r)."""
    method: OffsiteConfig = config.method_config
    num_layers = len(decoder_layers(handout))
    if num_layers != len({split_canonical_name(name)[0] for name in state}) or method.middle_keep_every != 1:
        raise ValueError("plugin_parts needs an offsite run with a full-depth hand-out and LoRA on every layer")
    k = method.adapter_layers_per_side
    ends = set(range(k)) | set(range(num_layers - k, num_layers))

    def keep(wanted: Callable[[str], bool]) -> AdapterState:
        return {name: tensor for name, tensor in state.items() if wanted(name)}

    return {
        "as trained": (state, 1.0),
        "without the parts on zeroed channels": (without_zeroed_channel_parts(state, handout), 1.0),
        "end layers only": (keep(lambda name: split_canonical_name(name)[0] in ends), 1.0),
        "middle layers only": (keep(lambda name: split_canonical_name(name)[0] not in ends), 1.0),
        "attention only": (keep(lambda name: ".self_attn." in name), 1.0),
        "MLP only": (keep(lambda name: ".mlp." in name), 1.0),
        "scale x0.5": (state, 0.5),
        "scale x1.5": (state, 1.5),
        "scale x2": (state, 2.0),
    }


def measure(run_dir: Path, progress: bool = True) -> dict[str, Any]:
    config = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    if config.method != "offsite":
        raise ValueError(f"{run_dir}: plugin_parts reads offsite runs, this one is {config.method!r}")
    adapter = config.method_config.adapter
    llm = load_model(config.model)
    _, handout = handed_out_emulator(llm, config, progress)
    task = load_task(config.task, config.data_dir, seed=config.seed)
    evaluate = EvalConfig(split="validation", limit=None).evaluator(task, progress=progress)
    row: dict[str, Any] = {"run": str(run_dir), "task": config.task, "examples": len(task.validation)}
    row["llm_zero_shot"] = evaluate(llm.model, llm.tokenizer, "LLM zero-shot", reuse=True)
    alpha_over_r = adapter.lora_alpha / adapter.lora_rank
    row["plugin"] = {}
    for name, (state, scale) in variants(final_adapter(run_dir), handout.model, config).items():
        with plugged_in(llm.model, state, adapter, lora_scale=scale * alpha_over_r) as plugged:
            row["plugin"][name] = evaluate(plugged, llm.tokenizer, name)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished offsite run directory (with checkpoints/)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    row = measure(args.run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plugin_parts.json").write_text(json.dumps(row, indent=2))
    llm = f"LLM zero-shot {100 * row['llm_zero_shot']:.1f}%"
    lines = [f"Validation split of {row['task']}, {row['examples']} examples; {llm}", ""]
    lines += ["| plug-in variant | accuracy |", "| --- | --- |"]
    lines += [f"| {name} | {100 * accuracy:.1f}% |" for name, accuracy in row["plugin"].items()]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
