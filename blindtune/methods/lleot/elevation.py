"""LLEOT's loss landscape elevation of a distilled emulator, on the server's public text.

Notation as in `blindtune.models.distill`: x a public text, L_M(P; x) model M's mean next-token loss
with the prompt P, P' a random proxy prompt; only the emulator's middle layers are trained.

Elevation (LLEOT): E_P',x | L_emu(P'; x) - L_LLM(P'; x) - H |, P' empty for half of each batch and,
for layer adapters, the same random perturbation of the adapter layers' weights in both models.
An exact margin gives PPL_emu = e^H PPL_LLM while grad_adapter L_emu = grad_adapter L_LLM.
Margin jitter (ours, J > 0): a uniform margin adds the same H to every token's loss, so the emulator
still ranks multiple-choice answers as the LLM does, and keeps its accuracy. With J > 0 token x_t's
margin is H_t = H + J z(x_t), z a fixed secret score of the vocabulary (mean 0 and standard deviation 1
on public text, so the PPL ratio stays e^H), and H above becomes the text's mean_t H_t. The margin
depends on the token, not on the context or the adapter, so adapter gradients are still the LLM's,
while answers are re-ranked by their tokens' z.

Elevated teacher (ours, teacher_weight > 0): the margin objective is one number per text, a weak signal
that 100 steps leave far from exact. An exact per-token margin is itself a distribution: with A a
secret set of absorbing tokens that public text never uses,

    p_teacher(y | ctx) = p_LLM(y | ctx) e^(-H_y)   for y outside A,   A takes the rest of the mass,

so -log p_teacher(y) = -log p_LLM(y) + H_y for every context and every adapter. The emulator learns it
token by token on the full vocabulary: the KL divergence of its distribution renormalised outside A from
the teacher's, plus the squared errors of its log-masses outside and inside A. Most of the emulator's
probability goes to absorbing tokens, so what it generates is junk, while its loss on real text tracks
the LLM's. Measured on SmolLM2-135M (benchmarks/results/acceptance/README.md): teacher plus margin
objective, J = 0, 100 steps: PPL ratio 99 against e^4 = 55; soft prompts trained on it transfer better
than on either OT emulator. LoRA on the adapter layers lands between OT-uniform and OT-distilled with
14 of 30 layers kept, but with 18 kept it learns to undo the elevation instead of the task (plug-in
below OT-uniform); elevating under a simulated client (`ElevationConfig.client_steps`) recovers part,
and holds the margin outright when clients (and so the simulated client) train the bottom layers only:
their LoRA then transfers better than the same LoRA on OT-distilled (32.5% against 27.5%, PPL ratio 181).
A LoRA-shaped simulated client at the clients'
learning rate undoes the margin faster than the middle layers restore it (plug-in no better).

`Elevation` is the stage `blindtune.models.distill.prepare_emulator` runs (and caches) after
distillation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from blindtune.models.distill import (
    EmulatorPair,
    ProxyPrompts,
    backward,
    optimise_middle,
    proxy_prompts,
    run_pass,
    split_prompted,
)
from blindtune.models.surgery import decoder_layers


@dataclass
class ElevationConfig:
    """Raise the emulator's loss a fixed margin above the LLM's across prompts and adapters.

    margin: H, in nats per token (PPL ratio e^H).
    steps / batch_size / max_length / learning_rate: as for distillation.
    proxy: the proxy prompts P' (half of each batch has none).
    adapter_weight_noise: relative std of the random perturbation applied to the adapter layers of
        both models at each step (0 disables it).
    margin_jitter: J, how far each token's margin departs from H: token y's target margin is
        H + J * z(y), z a fixed, secret (seeded) score of the vocabulary with mean 0 and standard
        deviation 1 on the public text (0: the same margin H for every token, as in the paper).
    margin_weight: weight of the paper's objective E |L_emu - L_LLM - H|.
    teacher_weight: weight of the token-level elevated-teacher loss (0: the paper's objective alone).
    absorbing_tokens: size of the teacher's secret absorbing set, drawn (seeded) from vocabulary
        entries the public text never uses.
    client_steps: elevate under a simulated client too: an update of the adapter layers, shared by both
        models, that descends the emulator's LM loss on the public batch as a client's adapter would
        (AdamW, `client_learning_rate`), restarting from the LLM's weights every `client_steps` steps
        (0 disables it). Random perturbations keep the margin around the untrained adapter only; a
        trained adapter finds the direction that undoes the elevation.
    client_every: elevate under the client's update on every n-th step only and under the untrained
        adapter on the others (1: always under the update); the client trains on every step either way.
    client_lora_rank / client_lora_alpha: shape the client's update as LoRA's, W + alpha / r * B @ A on
        every weight matrix of the adapter layers (A seeded, B = 0 at each restart; norms untouched), so
        it explores the subspace a LoRA client's adapter does, at a LoRA client's learning rate
        (0: every adapter-layer weight moves, as a `layers` client's do).
    """

    margin: float = 4.0
    steps: int = 100
    batch_size: int = 8
    max_length: int = 32
    learning_rate: float = 3e-4
    proxy: ProxyPrompts = field(default_factory=ProxyPrompts)
    adapter_weight_noise: float = 0.01
    margin_jitter: float = 0.0
    margin_weight: float = 1.0
    teacher_weight: float = 0.0
    absorbing_tokens: int = 256
    client_steps: int = 0
    client_learning_rate: float = 1e-4
    client_every: int = 1
    client_lora_rank: int = 0
    client_lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.max_length < 2 or self.learning_rate <= 0:
            raise ValueError(f"invalid elevation settings: {self}")
        if self.client_steps < 0 or self.client_learning_rate <= 0 or self.client_every < 1:
            raise ValueError(f"client_steps must be >= 0, client_learning_rate > 0, client_every >= 1: {self}")
        if self.client_lora_rank < 0 or self.client_lora_alpha <= 0:
            raise ValueError(f"client_lora_rank must be >= 0 and client_lora_alpha > 0: {self}")
        if self.margin_weight < 0 or self.teacher_weight < 0 or self.margin_weight + self.teacher_weight == 0:
            raise ValueError(f"margin_weight and teacher_weight must be >= 0, one of them > 0: {self}")
        if self.teacher_weight > 0 and (self.absorbing_tokens < 1 or self.margin <= 0):
            raise ValueError(f"the elevated teacher needs absorbing_tokens >= 1 and margin > 0: {self}")
        if self.adapter_weight_noise < 0 or self.margin_jitter < 0:
            raise ValueError(f"adapter_weight_noise and margin_jitter must be >= 0: {self}")
        if self.margin_jitter > 0 and 2 * self.margin_jitter >= self.margin:  # z is clipped to [-2, 2]
            raise ValueError(f"margin_jitter must be below margin / 2 so every token's margin is > 0: {self}")


@dataclass
class Elevation:
    """The elevation stage of `prepare_emulator`: `settings`, under a simulated client that trains
    `client_layers` (LLM indices; None: every adapter layer)."""

    settings: ElevationConfig
    client_layers: Sequence[int] | None = None
    name: str = "elevate"

    def train(
        self, pair: EmulatorPair, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, seed: int, progress: bool
    ) -> list[dict[str, float]]:
        return elevate_emulator(
            pair, tokenizer, texts, self.settings, seed=seed, progress=progress, client_layers=self.client_layers
        )


def elevate_emulator(
    pair: EmulatorPair,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: ElevationConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    client_layers: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """Train the emulator's middle layers (in place) towards L_emu = L_LLM + H (with the margin jitter,
    the text's mean token margin); per-step losses and margins. `client_layers`: the LLM layers the
    simulated client trains (None: every adapter layer)."""
    teacher = elevated_teacher(pair.llm, tokenizer, texts, config, seed)
    client = None
    if config.client_steps:
        lora = LowRankUpdate(config.client_lora_rank, config.client_lora_alpha) if config.client_lora_rank else None
        client = SimulatedClient(pair, config.client_steps, config.client_learning_rate, lora, seed, client_layers)

    def objective(
        pair: EmulatorPair, ids: Tensor, mask: Tensor, config: Any, generator: torch.Generator
    ) -> tuple[float, dict[str, float]]:
        client_loss = client.step(ids, mask) if client is not None else None
        if client is not None and client.taken % config.client_every:
            client.park()
        loss, parts = elevation_loss(pair, ids, mask, config, generator, teacher)
        return loss, parts if client_loss is None else {**parts, "client_loss": client_loss}

    try:
        return optimise_middle(pair, tokenizer, texts, config, objective, seed, progress, "elevate emulator")
    finally:
        if client is not None:
            client.restore()


@dataclass
class ElevatedTeacher:
    """The distribution an exact per-token margin describes (see the module docstring)."""

    token_margins: Tensor  # (vocabulary,): H_y
    absorbing: Tensor  # (vocabulary,) bool: the secret absorbing set A

    def loss(self, reference_logits: Tensor, emulator_logits: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """(KL of the emulator outside A from the teacher, mass error), each averaged over the predicted
        tokens (weights 1). The mass error is the squared error of the log-mass outside A plus that of
        the log-mass inside A: the first is what sets the margin, but it is flat while A holds almost
        nothing, where the second moves mass into A."""
        kept = ~self.absorbing.to(reference_logits.device)
        margins = self.token_margins.to(reference_logits.device)[kept]
        target = reference_logits.log_softmax(dim=-1)[..., kept] - margins
        target_kept = target.logsumexp(dim=-1, keepdim=True)
        emulated_all = emulator_logits.log_softmax(dim=-1)
        emulated = emulated_all[..., kept]
        emulated_kept = emulated.logsumexp(dim=-1, keepdim=True)
        target, emulated = target - target_kept, emulated - emulated_kept  # renormalised outside A
        divergence = (target.exp() * (target - emulated)).sum(dim=-1)
        target_absorbed = torch.log(-torch.expm1(target_kept))  # log(1 - mass outside A), margins > 0
        emulated_absorbed = emulated_all[..., ~kept].logsumexp(dim=-1, keepdim=True)
        mass_error = ((emulated_kept - target_kept).pow(2) + (emulated_absorbed - target_absorbed).pow(2)).squeeze(-1)
        total = weights.sum().clamp(min=1.0)
        return (divergence * weights).sum() / total, (mass_error * weights).sum() / total


def elevated_teacher(
    llm: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], config: ElevationConfig, seed: int
) -> ElevatedTeacher:
    """Token margins H + J z(y) and the absorbing set, both fixed by `seed` and the public text."""
    vocabulary = llm.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    token_margins = torch.full((vocabulary,), float(config.margin))
    absorbing = torch.zeros(vocabulary, dtype=torch.bool)
    if config.margin_jitter == 0 and config.teacher_weight == 0:  # the paper's uniform margin: no counts needed
        return ElevatedTeacher(token_margins=token_margins, absorbing=absorbing)
    counts = public_token_counts(tokenizer, texts, vocabulary)
    if config.margin_jitter > 0:
        token_margins += config.margin_jitter * margin_scores(llm, counts, seed)
    if config.teacher_weight > 0:
        unused = counts == 0
        unused[[i for i in tokenizer.all_special_ids if i < vocabulary]] = False
        candidates = unused.nonzero().flatten()
        if len(candidates) < config.absorbing_tokens:
            raise ValueError(
                f"only {len(candidates)} vocabulary entries are unused by the public text; "
                f"absorbing_tokens={config.absorbing_tokens} needs more"
            )
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
        absorbing[candidates[order[: config.absorbing_tokens]]] = True
    return ElevatedTeacher(token_margins=token_margins, absorbing=absorbing)


def public_token_counts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], vocabulary: int, max_texts: int = 2000
) -> Tensor:
    """(vocabulary,) how often each entry occurs in the first `max_texts` public texts."""
    counts = torch.zeros(vocabulary)
    for text in texts[:max_texts]:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        counts += torch.bincount(ids[ids < vocabulary], minlength=vocabulary).float()
    return counts


def margin_scores(llm: nn.Module, counts: Tensor, seed: int) -> Tensor:
    """z(y) of the margin jitter: each vocabulary entry's output embedding projected on a seeded random
    direction u, standardised by the token frequencies `counts` of the public text and clipped to [-2, 2].

    A shift of the emulator's final hidden state along u moves every token's logit by W_y . u, so
    this per-token margin is reachable by the middle layers without looking at the context, and
    thus without depending on the adapter."""
    head = llm.get_output_embeddings().weight.detach().float().cpu()  # type: ignore[operator]
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(head.shape[1], generator=generator)
    scores = head @ (direction / direction.norm())
    frequency = counts / counts.sum().clamp(min=1.0)
    mean = (frequency * scores).sum()
    std = (frequency * (scores - mean).pow(2)).sum().sqrt().clamp(min=1e-6)
    return ((scores - mean) / std).clamp(-2.0, 2.0)


def elevation_loss(
    pair: EmulatorPair,
    ids: Tensor,
    mask: Tensor,
    config: Any,
    generator: torch.Generator,
    teacher: ElevatedTeacher,
) -> tuple[float, dict[str, float]]:
    """The elevation loss of one batch, back-propagated; (loss, its parts and the mean margin)."""
    deviations, margins, divergences, mass_errors = [], [], [], []
    # Backward runs inside: autograd needs the perturbed adapter weights the forward pass saw.
    with _PerturbedAdapters(pair, config.adapter_weight_noise, generator):
        for prompted, part_ids, part_mask in split_prompted(ids, mask, config.proxy.length > 0):
            prompt = proxy_prompts(pair.llm, part_ids.shape[0], config.proxy, generator) if prompted else None
            reference, emulated = pair.passes(prompt, part_ids, part_mask)
            margin = emulated.nll - reference.nll
            targets = teacher.token_margins.to(margin.device)[part_ids[:, 1:]] * reference.weights
            target = targets.sum(dim=1) / reference.weights.sum(dim=1).clamp(min=1.0)
            deviations.append((margin - target).abs())
            margins.append(margin.detach())
            if config.teacher_weight > 0:
                divergence, mass_error = teacher.loss(reference.logits, emulated.logits, reference.weights)
                divergences.append(divergence)
                mass_errors.append(mass_error)
        deviation = torch.cat(deviations).mean()
        parts = {"deviation": deviation}
        loss = config.margin_weight * deviation
        if divergences:
            parts["teacher_divergence"] = torch.stack(divergences).mean()
            parts["teacher_mass_error"] = torch.stack(mass_errors).mean()
            loss = loss + config.teacher_weight * (parts["teacher_divergence"] + parts["teacher_mass_error"])
        backward(loss)
    return loss.item(), {
        **{name: value.item() for name, value in parts.items()},
        "margin": torch.cat(margins).mean().item(),
    }


def _adapter_parameter_pairs(
    pair: EmulatorPair, layers: Sequence[int] | None = None
) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(LLM parameter, emulator parameter) of the adapter `layers` (LLM indices; None: every adapter
    layer): copies of each other."""
    pairs = []
    llm_layers, emulator_layers = decoder_layers(pair.llm), decoder_layers(pair.emulator)
    position_of = pair.plan.emulator_position_of
    for source in pair.plan.adapter_layers if layers is None else layers:
        llm_parameters = dict(llm_layers[source].named_parameters())
        for name, emulated in emulator_layers[position_of[source]].named_parameters():
            pairs.append((llm_parameters[name], emulated))
    return pairs


@dataclass(frozen=True)
class LowRankUpdate:
    rank: int
    alpha: float


class SimulatedClient:
    """An adapter-layer update shared by both models that trains on the emulator's LM loss, as a client's
    adapter does (see `ElevationConfig.client_steps`). `restore()` puts the LLM's weights back.

    With `lora`, the update of each weight matrix W0 is s * B @ A (s = alpha / r): the factors are what
    AdamW trains, their gradients follow from W's by the chain rule, dB = s dW A^T and dA = s B^T dW.
    """

    def __init__(
        self,
        pair: EmulatorPair,
        steps: int,
        learning_rate: float,
        lora: LowRankUpdate | None = None,
        seed: int = 0,
        layers: Sequence[int] | None = None,
    ) -> None:
        self.pair, self.steps, self.learning_rate, self.lora = pair, steps, learning_rate, lora
        self.pairs = [p for p in _adapter_parameter_pairs(pair, layers) if lora is None or p[0].dim() == 2]
        self.originals = [reference.detach().clone() for reference, _ in self.pairs]
        self.generator = torch.Generator().manual_seed(seed)
        self.factors: list[tuple[Tensor, Tensor]] = []
        self.taken = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.parked: list[Tensor] | None = None

    def step(self, ids: Tensor, mask: Tensor) -> float:
        """One AdamW step of the update on this batch (after a restart every `steps` steps); its loss."""
        if self.taken % self.steps == 0:
            self._restart()
        elif self.parked is not None:
            self._load(self.parked)
        self.parked = None
        self.taken += 1
        assert self.optimizer is not None
        parameters = [emulated for _, emulated in self.pairs]
        for parameter in parameters:
            parameter.requires_grad_(True)
        try:
            pair = self.pair
            loss = run_pass(pair.emulator, pair.emulator_middle_layer, None, ids, mask).nll.mean()
            # autograd.grad leaves .grad alone: the middle layers' optimiser never sees these gradients.
            gradients = torch.autograd.grad(loss, parameters)
        finally:
            for parameter in parameters:
                parameter.requires_grad_(False)
        with torch.no_grad():
            if self.lora is None:
                for parameter, gradient in zip(parameters, gradients, strict=True):
                    parameter.grad = gradient
                self.optimizer.step()
                for reference, emulated in self.pairs:
                    emulated.grad = None
                    reference.copy_(emulated.to(reference))
            else:
                scale = self.lora.alpha / self.lora.rank
                for (a, b), gradient in zip(self.factors, gradients, strict=True):
                    a.grad = scale * b.T @ gradient.float()
                    b.grad = scale * gradient.float() @ a.T
                self.optimizer.step()
                self._load([w + scale * b @ a for w, (a, b) in zip(self.originals, self.factors, strict=True)])
        return loss.item()

    def park(self) -> None:
        """Put the LLM's weights back for a while; the next `step` continues from the update."""
        self.parked = [emulated.detach().clone() for _, emulated in self.pairs]
        self.restore()

    def restore(self) -> None:
        self._load(self.originals)

    def _restart(self) -> None:
        self.restore()
        trained: list[Tensor] = [emulated for _, emulated in self.pairs]
        if self.lora is not None:
            rank = self.lora.rank
            self.factors = []
            for original in self.originals:
                rows, columns = original.shape
                # peft's default A: uniform with bound 1 / sqrt(fan_in); B = 0, so the update starts at 0.
                a = (torch.rand(rank, columns, generator=self.generator) * 2 - 1) / math.sqrt(columns)
                self.factors.append((a.to(original.device), torch.zeros(rows, rank, device=original.device)))
            trained = [factor for a, b in self.factors for factor in (a, b)]
        self.optimizer = torch.optim.AdamW(trained, lr=self.learning_rate)

    def _load(self, weights: list[Tensor]) -> None:
        with torch.no_grad():
            for (reference, emulated), weight in zip(self.pairs, weights, strict=True):
                reference.copy_(weight.to(reference))
                emulated.copy_(weight.to(emulated))


class _PerturbedAdapters:
    """Add the same random perturbation to the adapter layers of both models; restore them on exit."""

    def __init__(self, pair: EmulatorPair, relative_std: float, generator: torch.Generator) -> None:
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self.originals: list[Tensor] = []
        if relative_std <= 0:
            return
        self.pairs = _adapter_parameter_pairs(pair)
        self.relative_std, self.generator = relative_std, generator

    def __enter__(self) -> None:
        with torch.no_grad():
            for reference, emulated in self.pairs:
                self.originals.append(reference.detach().clone())
                scale = self.relative_std * reference.float().pow(2).mean().sqrt().item()
                noise = torch.randn(reference.shape, generator=self.generator).to(reference) * scale
                reference.add_(noise)
                emulated.add_(noise.to(emulated))

    def __exit__(self, *_: object) -> None:
        with torch.no_grad():
            for (reference, emulated), original in zip(self.pairs, self.originals, strict=True):
                reference.copy_(original)
                emulated.copy_(original.to(emulated))
        self.originals.clear()
