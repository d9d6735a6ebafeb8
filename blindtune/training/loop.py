"""The one training loop every party uses: clients on emulators/proxies, the server for baselines.

It optimises the likelihood of each example's target continuation given its prompt (the same
tokenisation as evaluation, see `blindtune.encoding`), touching only trainable parameters.
The budget is counted in optimiser steps of `batch_size` examples, so every trained setting of a
benchmark sees the same number of examples.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.encoding import collate_pairs, continuation_loss, encode_pair

Item = TypeVar("Item")


@dataclass
class TrainConfig:
    """Local optimisation settings.

    steps: optimiser steps per call (per round for a client).
    batch_size: examples per step.
    learning_rate: AdamW learning rate; weight_decay: AdamW weight decay.
    max_length: prompt+target tokens kept per example (the prompt is cut from the left).
    max_grad_norm: gradient clipping threshold (<= 0 disables it).
    proximal_mu: FedProx's proximal weight: adds mu/2 * ||w - w_start||^2, w_start being the trainable
        weights at the start of the call (the global model in a round). 0 disables it (plain FedAvg).
    """

    steps: int = 20
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_length: int = 256
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        for name, valid, rule in (
            ("steps", self.steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("max_length", self.max_length >= 2, ">= 2"),
            ("proximal_mu", self.proximal_mu >= 0, ">= 0"),
        ):
            if not valid:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class AuxiliaryTask:
    """A second objective trained alongside the examples (multi-task, e.g. rationales next to labels).

    Each step also draws `batch_size` of these examples (their own seeded shuffle) and minimises
    L = L_main + weight * L_auxiliary, each the mean over its own continuation tokens: a long auxiliary
    target does not drown the short main one. An auxiliary target longer than `max_length` allows is
    cut to its beginning (a GSM8K worked solution can exceed it) rather than failing the client.
    """

    examples: Sequence[Example]
    weight: float

    def __post_init__(self) -> None:
        if not self.examples or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"an auxiliary task needs examples and a finite weight >= 0, got weight {self.weight}")


@dataclass
class TrainStats:
    mean_loss: float
    examples_seen: int
    tokens_seen: int
    seconds: float
    auxiliary_mean_loss: float | None = None  # set when an auxiliary task was trained
    # Indices (into the examples trained on) of those that were in a batch: the membership audit's members.
    trained_indices: frozenset[int] = frozenset()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds > 0 else 0.0


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the update must not leave this party."""


class PrivateTrainingRequiredError(RuntimeError):
    """Plain (non-DP) training was called where the party's privacy policy demands DP-SGD."""


# Set, to the reason, while a party's privacy policy demands DP-SGD (see `blindtune.privacy.context`):
# `train` then refuses to run, so code that bypasses the DP trainer fails instead of training without DP.
private_training_required: ContextVar[str | None] = ContextVar("private_training_required", default=None)


def batches(examples: Sequence[Item], batch_size: int, steps: int, seed: int) -> list[list[Item]]:
    """`steps` batches drawn by cycling through seeded shuffles (epochs) of `examples`."""
    if not examples:
        raise ValueError("cannot train on an empty example list")
    rng = random.Random(seed)
    order: list[Item] = []
    needed = steps * batch_size
    while len(order) < needed:
        epoch = list(examples)
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    seed: int,
    progress: bool = True,
    desc: str = "train",
    auxiliary: AuxiliaryTask | None = None,
) -> TrainStats:
    """Run `config.steps` AdamW steps on the model's trainable parameters (plus an auxiliary objective)."""
    if (reason := private_training_required.get()) is not None:
        raise PrivateTrainingRequiredError(f"{desc}: plain training refused: {reason}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    start = [p.detach().clone() for p in parameters] if config.proximal_mu > 0 else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.train()
    losses: list[float] = []
    auxiliary_losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    torch.manual_seed(seed)
    index_batches = batches(range(len(examples)), config.batch_size, config.steps, seed)
    main_batches = [[examples[i] for i in chunk] for chunk in index_batches]
    auxiliary_batches = (
        batches(auxiliary.examples, config.batch_size, config.steps, seed + 1) if auxiliary else [[]] * config.steps
    )
    for batch_examples, auxiliary_examples in tqdm(
        zip(main_batches, auxiliary_batches, strict=True),
        total=config.steps,
        desc=desc,
        disable=not progress,
        leave=False,
    ):
        pairs = [encode_pair(tokenizer, e.prompt, e.target, config.max_length) for e in batch_examples]
        batch = collate_pairs(pairs, pad_id)
        loss = continuation_loss(model, batch, packed=True)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"{desc}: loss became {loss.item()} after {len(losses)} steps")
        objective = loss + proximal_term(parameters, start, config.proximal_mu) if start else loss
        if auxiliary is not None:
            pairs = [
                encode_pair(tokenizer, e.prompt, e.target, config.max_length, cut_continuation=True)
                for e in auxiliary_examples
            ]
            auxiliary_batch = collate_pairs(pairs, pad_id)
            auxiliary_loss = continuation_loss(model, auxiliary_batch, packed=True)
            if not math.isfinite(auxiliary_loss.item()):
                raise NonFiniteLossError(f"{desc}: auxiliary loss became {auxiliary_loss.item()}")
            objective = objective + auxiliary.weight * auxiliary_loss
            auxiliary_losses.append(auxiliary_loss.item())
            tokens += int(auxiliary_batch.attention_mask.sum())
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        tokens += int(batch.attention_mask.sum())
    model.train(was_training)
    return TrainStats(
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        examples_seen=config.steps * config.batch_size,
        tokens_seen=tokens,
        seconds=time.perf_counter() - started,
        auxiliary_mean_loss=sum(auxiliary_losses) / len(auxiliary_losses) if auxiliary_losses else None,
        trained_indices=frozenset(i for chunk in index_batches for i in chunk),
    )


def proximal_term(parameters: Sequence[torch.Tensor], start: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * squared distance of the trainable weights from where the round started."""
    return 0.5 * mu * sum(((p - p0) ** 2).sum() for p, p0 in zip(parameters, start, strict=True))  # type: ignore[return-value]
