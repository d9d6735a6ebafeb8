"""How much a model handed out leaks of the LLM it was made from (the capability-privacy measures).

- `perplexities`: the handed-out model's and the LLM's perplexity on held-out text, and their ratio;
- `cpl`: capability leakage, its zero-shot accuracy as a percentage of the LLM's;
- `capability_retained`: the share of the LLM's *above-chance* accuracy it keeps (0: none, 1: all), the
  measure that stays meaningful on balanced tasks, where an input-blind model scores at chance;
- `adapter_gradient_cosine`: whether an adapter trained on it is trained for the LLM;
- `leakage_report`: the above for one emulator, as results.json's `privacy.emulator` holds them.

Offsite tuning, LLEOT and FedProxy measure their artefact with these on the server; the run-level
misuse audit (`blindtune.audits.audit`) measures the stored artefact after the run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.encoding import collate_pairs, continuation_loss, encode_pair
from blindtune.eval.scoring import perplexity
from blindtune.models.adapters import AdapterConfig, AdapterState, attach_adapter


@dataclass
class LeakageConfig:
    """What the server measures about the emulator it hands out (results.json `privacy`).

    extra_tasks: tasks besides the run's own on which zero-shot accuracy, CPL and capability retained
        are measured too (their data must be present).
    optional_tasks: the same, measured when their data files are present and listed under
        `skipped_tasks` with the reason otherwise (PIQA ships outside the package).
    gradient_examples: validation examples of the run's task for the adapter-gradient cosine
        (the experimenter's data, like the test split; never a client's).
    ppl_max_length: tokens per held-out public text for the perplexity ratio.
    """

    extra_tasks: list[str] = field(default_factory=lambda: ["wordnet-definition"])
    optional_tasks: list[str] = field(default_factory=lambda: ["piqa"])
    gradient_examples: int = 8
    ppl_max_length: int = 64


def perplexities(
    llm: nn.Module, emulator: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 64
) -> dict[str, float]:
    """emulator_ppl, llm_ppl and their ratio on held-out public text."""
    llm_ppl = perplexity(llm, tokenizer, texts, max_length=max_length, progress=False)
    emulator_ppl = perplexity(emulator, tokenizer, texts, max_length=max_length, progress=False)
    return {"emulator_ppl": emulator_ppl, "llm_ppl": llm_ppl, "ppl_ratio": emulator_ppl / llm_ppl}


def cpl(emulator_accuracy: float, llm_accuracy: float) -> float:
    """Capability leakage: emulator zero-shot accuracy as a percentage of the LLM's."""
    return 100.0 * emulator_accuracy / llm_accuracy if llm_accuracy > 0 else float("nan")


def chance_accuracy(examples: Sequence[Example]) -> float | None:
    """The expected accuracy of guessing uniformly among each example's options (None: not a
    multiple-choice task, e.g. instruction data scored by NLL)."""
    if not examples or not all(example.choices for example in examples):
        return None
    return sum(1 / len(example.choices) for example in examples) / len(examples)


def capability_retained(hand_out: float, llm: float, chance: float | None) -> float | None:
    """(hand-out accuracy - chance) / (LLM accuracy - chance): the share of the LLM's above-chance
    capability a client gets from the hand-out alone (0: none, 1: all). None when the LLM is at chance
    or the task has no chance level (not multiple choice)."""
    return None if chance is None or llm - chance <= 0 else (hand_out - chance) / (llm - chance)


@dataclass(frozen=True)
class ZeroShot:
    """One task's zero-shot accuracies of the LLM and of the hand-out, and the task's chance accuracy."""

    llm: float
    hand_out: float
    chance: float | None


def adapter_gradient_cosine(
    llm: nn.Module,
    emulator: nn.Module,
    layer_map: dict[int, int],
    adapter: AdapterConfig,
    state: AdapterState,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int = 256,
) -> float:
    """Cosine between the adapter's gradients on the emulator and on the LLM (same adapter, same batch)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = collate_pairs([encode_pair(tokenizer, e.prompt, e.target, max_length) for e in examples], pad_id)
    gradients = []
    for model, positions in ((emulator, layer_map), (llm, {source: source for source in layer_map.values()})):
        adapted = attach_adapter(copy.deepcopy(model), positions, adapter)
        adapted.load_state(state)
        named = adapted.named_adapter_parameters()
        parameters = [named[name] for name in sorted(named)]
        grads = torch.autograd.grad(continuation_loss(adapted.model, batch), parameters, allow_unused=True)
        gradients.append(
            torch.cat(
                [
                    torch.zeros(p.numel()) if g is None else g.detach().flatten().cpu()
                    for p, g in zip(parameters, grads, strict=True)
                ]
            )
        )
        del adapted
    emulated, reference = gradients
    return F.cosine_similarity(emulated.float(), reference.float(), dim=0).item()


def leakage_report(
    llm: nn.Module,
    emulator: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    heldout_texts: Sequence[str],
    zero_shot: dict[str, ZeroShot],
    *,
    margin: float | None = None,
    max_length: int = 64,
) -> dict[str, Any]:
    """Perplexities on held-out public text and, per task, the LLM's and the emulator's zero-shot
    accuracy, CPL and capability retained.

    `cpl` and `capability_retained` are the first task's (the run's own); `expected_ppl_ratio` is e^H
    when a margin H was trained.
    """
    report: dict[str, Any] = perplexities(llm, emulator, tokenizer, heldout_texts, max_length=max_length)
    if margin is not None:
        report["expected_ppl_ratio"] = math.exp(margin)
    report["tasks"] = {
        task: {
            "llm_zero_shot": scores.llm,
            "emulator_zero_shot": scores.hand_out,
            "chance": scores.chance,
            "cpl": cpl(scores.hand_out, scores.llm),
            "capability_retained": capability_retained(scores.hand_out, scores.llm, scores.chance),
        }
        for task, scores in zero_shot.items()
    }
    first: dict[str, Any] = next(iter(report["tasks"].values()), {})
    report["cpl"] = first.get("cpl", float("nan"))
    report["capability_retained"] = first.get("capability_retained")
    return report
