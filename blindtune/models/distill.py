"""Server-side emulator training on public text: distillation (OT's NLD, LLEOT's variant), loss
landscape elevation, and the measurements that say how much an emulator leaks.

Notation: x a public text, h_M(P; x) the hidden states at the output of model M's middle block (the
input of the top adapter layers) when the prompt P is prepended to x's embeddings, L_M(P; x) the mean
next-token loss of x, rms(h) the root mean square over the hidden dimension, P' ~ N(0, sigma^2) a
random proxy prompt (a share of them are real tokens' embeddings instead, the region where clients'
soft prompts start). Only the emulator's middle layers are trained; the adapter layers, embeddings,
norm and head stay the LLM's, so adapters still fit both models.

Distillation (Offsite-Tuning's NLD when ppd_weight = 0):

    L_KD  = E_x  mean_t,d ((h_LLM(x) - h_emu(x)) / rms(h_LLM(x)))^2
    L_PPD = E_P',x mean_t,d ((h_LLM(P'; x) - h_emu(P'; x)) / rms(h_LLM(P'; x)))^2
    L     = lm_weight * L_LM(emu) + ppd_weight * L_PPD + kd_weight * L_KD          (1 : 10 : 30)

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

Public text is the server's own (WordNet glosses of parts of speech the task does not use, another
task's prompts, or a text file): never client data.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blindtune.data import Example
from blindtune.encoding import collate_pairs, continuation_loss, encode_pair, pad_right
from blindtune.eval.scoring import perplexity
from blindtune.models.adapters import AdapterConfig, AdapterState, attach_adapter
from blindtune.models.loading import cache_dir, model_fingerprint, written_atomically
from blindtune.models.soft_prompt import run_with_prompt
from blindtune.models.surgery import LayerPlan, canonical_name, decoder_layers

log = logging.getLogger(__name__)

HELDOUT_TEXTS = 100  # public texts kept out of emulator training, for the perplexity measurement
_CACHE_VERSION = 1  # bump when the training procedure changes, so stale cached emulators are not reused


@dataclass
class ProxyPrompts:
    """Random proxy prompts P' prepended to public text.

    length: virtual tokens per proxy prompt (0 disables them).
    std: sigma of the Gaussian ones (the paper uses 20).
    token_fraction: share of proxy prompts made of real tokens' input embeddings instead (where
        clients' soft prompts are initialised).
    """

    length: int = 5
    std: float = 20.0
    token_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.length < 0 or self.std < 0 or not 0 <= self.token_fraction <= 1:
            raise ValueError(f"invalid proxy prompt settings: {self}")


@dataclass
class DistillConfig:
    """Distil the layer-dropped middle block towards the LLM on public text (adapters frozen).

    steps / batch_size / max_length / learning_rate: AdamW steps over batches of public texts of at
        most max_length tokens.
    lm_weight / kd_weight / ppd_weight: weights of the emulator's LM loss, of the hidden-state distance
        at the middle block's output, and of that distance under proxy prompts (0: Offsite-Tuning's NLD).
    proxy: the proxy prompts of L_PPD.
    """

    steps: int = 100
    batch_size: int = 8
    max_length: int = 32
    learning_rate: float = 1e-4
    lm_weight: float = 1.0
    kd_weight: float = 30.0
    ppd_weight: float = 0.0
    proxy: ProxyPrompts = field(default_factory=ProxyPrompts)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.max_length < 2 or self.learning_rate <= 0:
            raise ValueError(f"invalid distillation settings: {self}")


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
class LeakageConfig:
    """What the server measures about the emulator it hands out (results.json `privacy`).

    extra_tasks: tasks besides the run's own on which zero-shot accuracy and CPL are measured too.
    gradient_examples: validation examples of the run's task for the adapter-gradient cosine
        (the experimenter's data, like the test split; never a client's).
    ppl_max_length: tokens per held-out public text for the perplexity ratio.
    """

    extra_tasks: list[str] = field(default_factory=list)
    gradient_examples: int = 8
    ppl_max_length: int = 64


# ---- public text -------------------------------------------------------------------------------


@dataclass
class PublicTexts:
    train: list[str]
    heldout: list[str]


def public_texts(source: str, task: str | None = None, seed: int = 0) -> PublicTexts:
    """Texts the server owns, split into training texts and HELDOUT_TEXTS held-out ones.

    source: `wordnet:<pos>[,<pos>...]` (glosses of WordNet's data.<pos> files, e.g. `wordnet:adj,adv`;
    $WORDNET_DIR or /usr/share/wordnet), `task:<name>` (the prompts of a registered task's train split,
    e.g. `task:gsm8k`), or the path of a text file with one text per line.
    task: the run's task; a `task:` source naming it is refused (that is client data).
    """
    if source.startswith("wordnet:"):
        texts = _wordnet_glosses(source.removeprefix("wordnet:").split(","))
    elif source.startswith("task:"):
        name = source.removeprefix("task:")
        if task is not None and name == task:
            raise ValueError(f"public text {source!r} is the clients' task: the server may not train on it")
        from blindtune.data import load_task

        texts = [example.prompt for example in load_task(name, seed=seed).train]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"public text {source!r} is neither wordnet:<pos>, task:<name> nor a text file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = sorted(set(texts))
    if len(texts) < 2 * HELDOUT_TEXTS:
        raise ValueError(f"public text {source!r} has {len(texts)} distinct texts; need at least {2 * HELDOUT_TEXTS}")
    random.Random(seed).shuffle(texts)
    return PublicTexts(train=texts[HELDOUT_TEXTS:], heldout=texts[:HELDOUT_TEXTS])


def _wordnet_glosses(parts_of_speech: Sequence[str]) -> list[str]:
    import os

    from blindtune.data.wordnet import DEFAULT_WORDNET_DIR, read_synsets

    directory = Path(os.environ.get("WORDNET_DIR", DEFAULT_WORDNET_DIR))
    texts = []
    for pos in parts_of_speech:
        texts += [synset.gloss for synset in read_synsets(directory / f"data.{pos.strip()}")]
    return texts


# ---- forward passes ------------------------------------------------------------------------------


@dataclass
class _Pass:
    middle: Tensor  # (batch, length, hidden): the middle block's output at the text positions
    token_nll: Tensor  # (batch, length - 1): next-token losses, zero after each text's end
    weights: Tensor  # (batch, length - 1): 1 where a real token is predicted
    logits: Tensor  # (batch, length - 1, vocabulary), float32

    @property
    def nll(self) -> Tensor:
        """(batch,): the mean next-token loss of each text."""
        return self.token_nll.sum(dim=1) / self.weights.sum(dim=1).clamp(min=1.0)


def _run(model: nn.Module, middle_layer: nn.Module, prompt: Tensor | None, ids: Tensor, mask: Tensor) -> _Pass:
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = middle_layer.register_forward_hook(keep)
    try:
        causal: Any = model
        output: Any = run_with_prompt(
            causal.get_decoder(), causal.get_input_embeddings(), prompt, ids, mask, use_cache=False
        )
        hidden: Tensor = output.last_hidden_state
    finally:
        handle.remove()
    prompt_length = 0 if prompt is None else prompt.shape[-2]
    logits = causal.get_output_embeddings()(hidden[:, :-1]).float()
    token_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    weights = mask[:, 1:].to(token_nll.dtype)
    return _Pass(middle=captured[-1][:, prompt_length:], token_nll=token_nll * weights, weights=weights, logits=logits)


def hidden_distance(reference: Tensor, other: Tensor, mask: Tensor) -> Tensor:
    """mean over real tokens and dimensions of ((reference - other) / rms(reference))^2."""
    rms = reference.float().pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-6)
    per_token = ((reference.float() - other.float()) / rms).pow(2).mean(dim=-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


@dataclass
class EmulatorPair:
    """The LLM and its emulator, with the layers whose outputs are the middle block's output."""

    llm: nn.Module
    emulator: nn.Module
    plan: LayerPlan

    @property
    def llm_middle_layer(self) -> nn.Module:
        return decoder_layers(self.llm)[self.plan.top[0] - 1]

    @property
    def emulator_middle_layer(self) -> nn.Module:
        return decoder_layers(self.emulator)[len(self.plan.bottom) + len(self.plan.middle) - 1]

    def middle_parameters(self) -> list[nn.Parameter]:
        layers = decoder_layers(self.emulator)
        positions = range(len(self.plan.bottom), len(self.plan.bottom) + len(self.plan.middle))
        return [p for position in positions for p in layers[position].parameters()]

    def passes(self, prompt: Tensor | None, ids: Tensor, mask: Tensor) -> tuple[_Pass, _Pass]:
        """(LLM pass without gradients, emulator pass with them)."""
        with torch.no_grad():
            reference = _run(self.llm, self.llm_middle_layer, prompt, ids, mask)
        return reference, _run(self.emulator, self.emulator_middle_layer, prompt, ids, mask)


def proxy_prompts(model: nn.Module, rows: int, settings: ProxyPrompts, generator: torch.Generator) -> Tensor:
    """(rows, length, hidden) random proxy prompts: Gaussian, or real tokens' embeddings."""
    table = model.get_input_embeddings().weight  # type: ignore[operator]
    gaussian = torch.randn(rows, settings.length, table.shape[1], generator=generator) * settings.std
    ids = torch.randint(0, table.shape[0], (rows, settings.length), generator=generator)
    tokens = table.detach()[ids.to(table.device)].cpu()
    use_tokens = torch.rand(rows, 1, 1, generator=generator) < settings.token_fraction
    return torch.where(use_tokens, tokens, gaussian).to(table.device, table.dtype)


class TextBatches:
    """Seeded random batches of public texts, tokenised when drawn (most texts are never drawn)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, seed: int) -> None:
        if not texts:
            raise ValueError("no public text to train on")
        self.tokenizer, self.texts, self.max_length = tokenizer, list(texts), max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rng = random.Random(seed)

    def next(self, size: int) -> tuple[Tensor, Tensor]:
        sequences: list[list[int]] = []
        while len(sequences) < size:
            text = self.texts[self.rng.randrange(len(self.texts))]
            ids = list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
            if len(ids) >= 2:
                sequences.append(ids)
        return pad_right(sequences, self.pad_id)


def _split(ids: Tensor, mask: Tensor, with_prompts: bool) -> list[tuple[bool, Tensor, Tensor]]:
    """Half of a batch without a prompt and half with one (or all without)."""
    if not with_prompts or ids.shape[0] < 2:
        return [(False, ids, mask)]
    half = ids.shape[0] // 2
    return [(False, ids[:half], mask[:half]), (True, ids[half:], mask[half:])]


# ---- training ------------------------------------------------------------------------------------


def distill_emulator(
    pair: EmulatorPair,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: DistillConfig,
    *,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train the emulator's middle layers (in place) with L_LM + ppd * L_PPD + kd * L_KD; per-step losses."""
    return _optimise(pair, tokenizer, texts, config, _distill_loss, seed, progress, "distil emulator")


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
        lora = _LowRankUpdate(config.client_lora_rank, config.client_lora_alpha) if config.client_lora_rank else None
        client = _SimulatedClient(pair, config.client_steps, config.client_learning_rate, lora, seed, client_layers)

    def objective(
        pair: EmulatorPair, ids: Tensor, mask: Tensor, config: Any, generator: torch.Generator
    ) -> tuple[float, dict[str, float]]:
        client_loss = client.step(ids, mask) if client is not None else None
        if client is not None and client.taken % config.client_every:
            client.park()
        loss, parts = _elevation_loss(pair, ids, mask, config, generator, teacher)
        return loss, parts if client_loss is None else {**parts, "client_loss": client_loss}

    try:
        return _optimise(pair, tokenizer, texts, config, objective, seed, progress, "elevate emulator")
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


def _distill_loss(
    pair: EmulatorPair, ids: Tensor, mask: Tensor, config: Any, generator: torch.Generator
) -> tuple[float, dict[str, float]]:
    """The distillation loss of one batch, back-propagated; (loss, its parts)."""
    parts: dict[str, Tensor] = {}
    for prompted, part_ids, part_mask in _split(ids, mask, config.ppd_weight > 0 and config.proxy.length > 0):
        prompt = proxy_prompts(pair.llm, part_ids.shape[0], config.proxy, generator) if prompted else None
        reference, emulated = pair.passes(prompt, part_ids, part_mask)
        distance = hidden_distance(reference.middle, emulated.middle, part_mask)
        if prompted:
            parts["ppd"] = distance
        else:
            parts["kd"] = distance
            parts["lm"] = emulated.nll.mean()
    loss = config.lm_weight * parts["lm"] + config.kd_weight * parts["kd"]
    if "ppd" in parts:
        loss = loss + config.ppd_weight * parts["ppd"]
    _backward(loss)
    return loss.item(), {name: value.item() for name, value in parts.items()}


def _elevation_loss(
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
        for prompted, part_ids, part_mask in _split(ids, mask, config.proxy.length > 0):
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
        _backward(loss)
    return loss.item(), {
        **{name: value.item() for name, value in parts.items()},
        "margin": torch.cat(margins).mean().item(),
    }


def _backward(loss: Tensor) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"the loss became {loss.item()}")
    loss.backward()


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
class _LowRankUpdate:
    rank: int
    alpha: float


class _SimulatedClient:
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
        lora: _LowRankUpdate | None = None,
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
            loss = _run(pair.emulator, pair.emulator_middle_layer, None, ids, mask).nll.mean()
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


def optimise_parameters(
    model: nn.Module,
    parameters: list[nn.Parameter],
    steps: int,
    learning_rate: float,
    backward_step: Callable[[], dict[str, float]],
    desc: str,
    progress: bool,
) -> list[dict[str, float]]:
    """AdamW on `parameters` alone: the rest of `model` is frozen meanwhile, then restored. Each step,
    `backward_step()` computes the loss, back-propagates it and returns its parts (with `loss`);
    gradients are clipped to norm 1. Returns the parts of every step."""
    states = {id(p): p.requires_grad for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    was_training = model.training
    model.train()
    history = []
    try:
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            try:
                parts = backward_step()
            except FloatingPointError as error:
                raise FloatingPointError(f"{desc}, step {step}: {error}") from error
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            history.append(parts)
    finally:
        model.train(was_training)
        for parameter in model.parameters():
            parameter.requires_grad_(states[id(parameter)])
    if history:
        log.info("%s: first %s, last %s", desc, history[0], history[-1])
    return history


def _optimise(
    pair: EmulatorPair,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: Any,
    objective: Any,
    seed: int,
    progress: bool,
    desc: str,
) -> list[dict[str, float]]:
    parameters = pair.middle_parameters()
    if not parameters:
        raise ValueError("the emulator has no middle layers to train")
    batches = TextBatches(tokenizer, texts, config.max_length, seed)
    generator = torch.Generator().manual_seed(seed)
    pair.llm.eval()

    def backward_step() -> dict[str, float]:
        ids, mask = batches.next(config.batch_size)
        loss, parts = objective(pair, ids, mask, config, generator)
        return {"loss": loss, **parts}

    return optimise_parameters(
        pair.emulator, parameters, config.steps, config.learning_rate, backward_step, desc, progress
    )


# ---- preparing (and caching) an emulator -----------------------------------------------------------


@dataclass
class PreparedEmulator:
    model: PreTrainedModel
    history: dict[str, list[dict[str, float]]]  # per stage ("distill", "elevate"), per step
    from_cache: bool


def prepare_emulator(
    llm: PreTrainedModel,
    emulator: PreTrainedModel,
    plan: LayerPlan,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    distill: DistillConfig | None,
    elevation: ElevationConfig | None = None,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
    client_layers: Sequence[int] | None = None,
) -> PreparedEmulator:
    """Distil (if `distill`) then elevate (if `elevation`) `emulator` in place; `client_layers` as for
    `elevate_emulator`.

    With `cache`, the trained middle layers are stored in the user cache directory under a key of the
    LLM's weights, the plan, the settings, the texts and the seed, and reused by later runs.
    """
    pair = EmulatorPair(llm, emulator, plan)
    path = _cache_path(llm, plan, texts, distill, elevation, seed, client_layers) if cache else None
    history: dict[str, list[dict[str, float]]] = {}
    if path is not None and path.is_file():
        _load_middle(pair, path)
        history = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        return PreparedEmulator(model=emulator, history=history, from_cache=True)
    if distill is not None:
        if path is not None and elevation is not None:  # the distilled stage is itself cached (OT-distilled)
            earlier = prepare_emulator(
                llm, emulator, plan, tokenizer, texts, distill=distill, seed=seed, cache=True, progress=progress
            )
            history.update(earlier.history)
        else:
            history["distill"] = distill_emulator(pair, tokenizer, texts, distill, seed=seed, progress=progress)
    if elevation is not None:
        history["elevate"] = elevate_emulator(
            pair, tokenizer, texts, elevation, seed=seed + 1, progress=progress, client_layers=client_layers
        )
    if path is not None:
        _save_middle(pair, path)
        path.with_suffix(".json").write_text(json.dumps(history))
    return PreparedEmulator(model=emulator, history=history, from_cache=False)


def _cache_path(
    llm: nn.Module,
    plan: LayerPlan,
    texts: Sequence[str],
    distill: DistillConfig | None,
    elevation: ElevationConfig | None,
    seed: int,
    client_layers: Sequence[int] | None = None,
) -> Path:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, asdict(plan), seed]).encode())
    # Only a subset of the adapter layers changes the key, so the keys of emulators cached before it existed hold.
    if client_layers is not None and tuple(client_layers) != plan.adapter_layers:
        digest.update(json.dumps(list(client_layers)).encode())
    digest.update(json.dumps([asdict(distill) if distill else None, asdict(elevation) if elevation else None]).encode())
    digest.update("\n".join(texts).encode())
    digest.update(model_fingerprint(llm).encode())
    return cache_dir() / "emulators" / f"{digest.hexdigest()[:24]}.safetensors"


def _save_middle(pair: EmulatorPair, path: Path) -> None:
    with written_atomically(path) as temporary:
        save_file({n: p.detach().cpu().contiguous() for n, p in _named_middle(pair).items()}, str(temporary))


def _load_middle(pair: EmulatorPair, path: Path) -> None:
    stored = load_file(str(path))
    own = _named_middle(pair)
    if set(stored) != set(own):
        raise ValueError(f"cached emulator {path} does not fit this model; delete it")
    with torch.no_grad():
        for name, parameter in own.items():
            parameter.copy_(stored[name])


def _named_middle(pair: EmulatorPair) -> dict[str, nn.Parameter]:
    middle = {pair.plan.emulator_position_of[source]: source for source in pair.plan.middle}
    named = {}
    for name, parameter in pair.emulator.named_parameters():
        canonical = canonical_name(name, middle)
        if canonical is not None:
            named[canonical] = parameter
    return named


# ---- measurements ----------------------------------------------------------------------------------


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
    zero_shot: dict[str, tuple[float, float]],
    *,
    margin: float | None = None,
    max_length: int = 64,
) -> dict[str, Any]:
    """Perplexities on held-out public text and, per task, (LLM, emulator) zero-shot accuracy and CPL.

    `cpl` is the first task's (the run's own); `expected_ppl_ratio` is e^H when a margin H was trained.
    """
    report: dict[str, Any] = perplexities(llm, emulator, tokenizer, heldout_texts, max_length=max_length)
    if margin is not None:
        report["expected_ppl_ratio"] = math.exp(margin)
    report["tasks"] = {
        task: {
            "llm_zero_shot": llm_accuracy,
            "emulator_zero_shot": emulator_accuracy,
            "cpl": cpl(emulator_accuracy, llm_accuracy),
        }
        for task, (llm_accuracy, emulator_accuracy) in zero_shot.items()
    }
    report["cpl"] = next(iter(report["tasks"].values()))["cpl"] if zero_shot else float("nan")
    return report
