"""DP-SGD for a client's adapter with Opacus: per-example clipping, Gaussian noise, accounting.

`train_private` is `blindtune.training.train` made differentially private, with the same tokenisation
and scoring (`blindtune.encoding`) and the same budget in optimiser steps:

- Opacus' `PrivacyEngine.make_private` wraps the model in a `GradSampleModule` (hooks on the trainable
  modules compute each example's gradient) and the AdamW optimiser in a `DPOptimizer` (clips each
  example's gradient to `max_grad_norm`, adds N(0, (noise_multiplier * max_grad_norm)^2) to the sum);
  its `DPDataLoader` draws Poisson-sampled batches (each example independently with probability
  q = 1 / ceil(N / batch_size)), which is what the accountant's subsampled-Gaussian analysis assumes.
- The loss is the mean over the batch of each example's own loss (mean NLL of its target tokens), so
  every example's gradient is its own: Opacus's `loss_reduction="mean"` undoes the batch mean.
- Before any step, the model is checked: a trainable module Opacus cannot handle (buffers, batch
  statistics) stops training with `DPUnsupportedError`; after the first backward pass, a trainable
  parameter without a per-example gradient does too. Nothing is ever trained without DP by accident.
- The accountant's history is loaded from and saved to the client's work directory, so the epsilon
  reported after each round composes every step of every round so far.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.encoding import ContinuationBatch, collate_pairs, continuation_logprobs, encode_pair
from blindtune.privacy.accountant import (
    OpacusMissingError,
    epsilon,
    load_accountant,
    noise_for_budget,
    save_accountant,
)
from blindtune.privacy.config import DPSGDConfig
from blindtune.training.loop import NonFiniteLossError, TrainConfig, TrainStats


class DPUnsupportedError(RuntimeError):
    """Opacus cannot compute per-example gradients for this model; nothing was trained."""


class PrivacyBudgetExceededError(RuntimeError):
    """Training this round would spend more than the configured target epsilon; nothing was trained."""


@dataclass
class PrivacySpent:
    """What a DP-SGD call spent, and the client's total so far (all rounds of this run)."""

    epsilon: float  # total so far, at `delta`
    delta: float
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    steps: int  # this call
    total_steps: int
    accountant: str
    noise_only_steps: int = 0  # this call's steps whose Poisson batch was empty

    def metrics(self) -> dict[str, float | int]:
        """Flat numbers for a client's MetricRecord (an infinite epsilon is sent as -1)."""
        return {
            "dp_epsilon": self.epsilon if math.isfinite(self.epsilon) else -1.0,
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sample_rate": self.sample_rate,
            "dp_max_grad_norm": self.max_grad_norm,
            "dp_steps": self.total_steps,
        }


def _opacus() -> Any:
    try:
        import opacus
    except ImportError as error:  # pragma: no cover - opacus is installed where DP is used
        raise OpacusMissingError("differential privacy needs Opacus: pip install 'opacus>=1.5'") from error
    return opacus


def privacy_problems(model: nn.Module) -> list[str]:
    """Why Opacus cannot make `model` private (empty when it can), from its own validators."""
    _opacus()
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # the validators judge the model as it trains
    try:
        problems = [str(error) for error in ModuleValidator.validate(model, strict=False)]
        problems += [str(error) for error in GradSampleModule.validate(model, strict=False)]
    finally:
        model.train(was_training)
    shared: dict[int, str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{module_name} ({type(module).__name__}) mixes the examples of a batch")
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            where = f"{module_name}.{name}" if module_name else name
            if id(parameter) in shared:
                problems.append(
                    f"trainable parameter {where} is also {shared[id(parameter)]}: per-example gradients of a "
                    "parameter used by two modules are not supported"
                )
            shared[id(parameter)] = where
    return problems


def check_privatizable(model: nn.Module) -> None:
    """Raise `DPUnsupportedError` unless Opacus can compute per-example gradients for `model`."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    problems = privacy_problems(model)
    if problems:
        raise DPUnsupportedError(
            "Opacus cannot make this model private, so DP-SGD refuses to train it: " + "; ".join(problems)
        )


def per_example_loss(model: nn.Module, batch: ContinuationBatch) -> Tensor:
    """Each example's mean negative log-likelihood of its target tokens, shape (batch,)."""
    return torch.stack([-logprobs.mean() for logprobs in continuation_logprobs(model, batch)])


def _check_grad_samples(parameters: Sequence[nn.Parameter], batch_size: int) -> None:
    for index, parameter in enumerate(parameters):
        sample = getattr(parameter, "grad_sample", None)
        if sample is None or (isinstance(sample, Tensor) and sample.shape[0] != batch_size):
            raise DPUnsupportedError(
                f"Opacus computed no per-example gradient for trainable parameter #{index} "
                f"(shape {tuple(parameter.shape)}): its module is not supported; nothing was sent"
            )


def resolve_noise(dp: DPSGDConfig, delta: float, sample_rate: float, planned_steps: int) -> float:
    """The configured noise multiplier, or the one whose epsilon after `planned_steps` meets the target."""
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.target_epsilon is not None  # DPSGDConfig guarantees one of the two
    return noise_for_budget(dp.accountant, dp.target_epsilon, delta, sample_rate, planned_steps)


class DeltaTooLargeError(ValueError):
    """delta >= 1/N: a mechanism that publishes one record outright would satisfy the guarantee."""


def resolve_delta(dp: DPSGDConfig, num_examples: int) -> float:
    """The delta a client with `num_examples` records accounts at: the configured one, or by default
    min(1e-5, 1 / (10 N)); a delta >= 1/N is refused (it allows releasing a whole record)."""
    if dp.delta is None:
        return min(1e-5, 1.0 / (10 * num_examples))
    if dp.delta >= 1.0 / num_examples:
        raise DeltaTooLargeError(
            f"privacy.dp.delta = {dp.delta:g} is >= 1/N = 1/{num_examples} for a client with {num_examples} "
            f"examples; use at most min(1e-5, 1/(10 N)) = {min(1e-5, 1.0 / (10 * num_examples)):.3g}"
        )
    return dp.delta


def train_private(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: TrainConfig,
    dp: DPSGDConfig,
    workdir: Path,
    *,
    seed: int,
    round_number: int,
    planned_rounds: int,
    progress: bool = True,
    desc: str = "train (DP)",
) -> tuple[TrainStats, PrivacySpent]:
    """Run `config.steps` DP-SGD (AdamW) steps on the model's trainable parameters.

    The accountant state in `workdir` is read before and written after; with `dp.target_epsilon`, the
    noise is calibrated so that `planned_rounds` rounds of `config.steps` steps spend at most that, and
    a round that would spend more is refused.
    """
    opacus = _opacus()
    if config.proximal_mu > 0:
        raise DPUnsupportedError("FedProx's proximal term is not supported with DP-SGD (its gradient would be lost)")
    if not examples:
        raise ValueError("cannot train on an empty example list")
    check_privatizable(model)
    num_examples = len(examples)
    delta = resolve_delta(dp, num_examples)
    state = load_accountant(workdir, dp.accountant, delta)
    batch_size = min(config.batch_size, num_examples)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(num_examples)), batch_size)
    sample_rate = 1.0 / len(loader)  # what Opacus' Poisson sampler and accountant use
    noise = resolve_noise(dp, delta, sample_rate, config.steps * planned_rounds)
    if dp.target_epsilon is not None:
        projected = epsilon(dp.accountant, [*state.history, (noise, sample_rate, config.steps)], delta)
        if projected > dp.target_epsilon * 1.01:
            raise PrivacyBudgetExceededError(
                f"round {round_number} would bring epsilon to {projected:.3g} > target {dp.target_epsilon} "
                f"(already spent {state.epsilon():.3g} over rounds {state.rounds})"
            )

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = opacus.PrivacyEngine(accountant=str(dp.accountant), secure_mode=dp.secure_mode)
    engine.accountant.history = list(state.history)
    torch.manual_seed(seed)  # Poisson sampling draws from the global generator
    noise_generator = None if dp.secure_mode else torch.Generator().manual_seed(seed + 1)
    was_training = model.training
    model.train()
    private_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses: list[float] = []
    tokens = examples_seen = steps = empty = 0
    trained: set[int] = set()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, desc=desc, disable=not progress, leave=False)
    try:
        while steps < config.steps:
            for (indices,) in dp_loader:
                if steps >= config.steps:
                    break
                batch_examples = [examples[i] for i in indices.tolist()]
                trained.update(indices.tolist())
                if batch_examples:
                    pairs = [encode_pair(tokenizer, e.prompt, e.target, config.max_length) for e in batch_examples]
                    batch = collate_pairs(pairs, pad_id)
                    # The model itself, not the wrapper: the hooks sit on its modules either way.
                    loss = per_example_loss(model, batch).mean()
                    if not math.isfinite(loss.item()):
                        raise NonFiniteLossError(f"{desc}: loss became {loss.item()} after {steps} steps")
                    with warnings.catch_warnings():  # Opacus' hooks also fire where inputs need no gradient
                        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                        loss.backward()
                    _check_grad_samples(parameters, len(batch_examples))
                    losses.append(loss.item())
                    tokens += int(batch.attention_mask.sum())
                    examples_seen += len(batch_examples)
                else:  # an empty Poisson batch: the step is noise only, and still counts
                    empty += 1
                    for parameter in parameters:
                        parameter.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                            (0, *parameter.shape), dtype=parameter.dtype, device=parameter.device
                        )
                dp_optimizer.step()
                dp_optimizer.zero_grad(set_to_none=True)
                steps += 1
                bar.update(1)
    finally:
        bar.close()
        private_model.cleanup()  # remove Opacus' hooks and per-example gradients from the model
        for parameter in parameters:
            parameter.grad = None
        model.train(was_training)

    state.history = [(float(n), float(q), int(s)) for n, q, s in engine.accountant.history]
    state.rounds.append(round_number)
    save_accountant(workdir, state)
    stats = TrainStats(
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        examples_seen=examples_seen,
        tokens_seen=tokens,
        seconds=time.perf_counter() - started,
        trained_indices=frozenset(trained),
    )
    spent = PrivacySpent(
        epsilon=state.epsilon(),
        delta=delta,
        noise_multiplier=noise,
        sample_rate=sample_rate,
        max_grad_norm=dp.max_grad_norm,
        steps=steps,
        total_steps=state.steps,
        accountant=str(dp.accountant),
        noise_only_steps=empty,
    )
    return stats, spent
