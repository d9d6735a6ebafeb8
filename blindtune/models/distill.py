"""Server-side emulator training on public text: distillation (OT's NLD, LLEOT's variant), the
training loop of the emulator's middle block, and the cache of prepared emulators.

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

Further stages (LLEOT's loss landscape elevation, `blindtune.methods.lleot.elevation`) train the
same middle block after distillation through `prepare_emulator(..., then=stage)`, which caches them.

Public text is the server's own (WordNet glosses of parts of speech the task does not use, another
task's prompts, or a text file): never client data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blindtune.encoding import pad_right
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
class ModelPass:
    middle: Tensor  # (batch, length, hidden): the middle block's output at the text positions
    token_nll: Tensor  # (batch, length - 1): next-token losses, zero after each text's end
    weights: Tensor  # (batch, length - 1): 1 where a real token is predicted
    logits: Tensor  # (batch, length - 1, vocabulary), float32

    @property
    def nll(self) -> Tensor:
        """(batch,): the mean next-token loss of each text."""
        return self.token_nll.sum(dim=1) / self.weights.sum(dim=1).clamp(min=1.0)


def run_pass(model: nn.Module, middle_layer: nn.Module, prompt: Tensor | None, ids: Tensor, mask: Tensor) -> ModelPass:
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
    return ModelPass(
        middle=captured[-1][:, prompt_length:], token_nll=token_nll * weights, weights=weights, logits=logits
    )


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

    def passes(self, prompt: Tensor | None, ids: Tensor, mask: Tensor) -> tuple[ModelPass, ModelPass]:
        """(LLM pass without gradients, emulator pass with them)."""
        with torch.no_grad():
            reference = run_pass(self.llm, self.llm_middle_layer, prompt, ids, mask)
        return reference, run_pass(self.emulator, self.emulator_middle_layer, prompt, ids, mask)


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


def split_prompted(ids: Tensor, mask: Tensor, with_prompts: bool) -> list[tuple[bool, Tensor, Tensor]]:
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
    return optimise_middle(pair, tokenizer, texts, config, _distill_loss, seed, progress, "distil emulator")


def _distill_loss(
    pair: EmulatorPair, ids: Tensor, mask: Tensor, config: Any, generator: torch.Generator
) -> tuple[float, dict[str, float]]:
    """The distillation loss of one batch, back-propagated; (loss, its parts)."""
    parts: dict[str, Tensor] = {}
    for prompted, part_ids, part_mask in split_prompted(ids, mask, config.ppd_weight > 0 and config.proxy.length > 0):
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
    backward(loss)
    return loss.item(), {name: value.item() for name, value in parts.items()}


def backward(loss: Tensor) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"the loss became {loss.item()}")
    loss.backward()


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


def optimise_middle(
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


class EmulatorStage(Protocol):
    """A training stage of the emulator's middle block after distillation (LLEOT's elevation).

    name: its key in `PreparedEmulator.history`. settings: a dataclass, part of the cache key, as
    are `client_layers` (LLM layers a stage trains under, None: every adapter layer).
    """

    name: str
    settings: Any
    client_layers: Sequence[int] | None

    def train(
        self, pair: EmulatorPair, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, seed: int, progress: bool
    ) -> list[dict[str, float]]:
        """Train the emulator's middle layers in place; per-step losses."""
        ...


@dataclass
class PreparedEmulator:
    model: PreTrainedModel
    history: dict[str, list[dict[str, float]]]  # per stage ("distill", then the stage's name), per step
    from_cache: bool


def prepare_emulator(
    llm: PreTrainedModel,
    emulator: PreTrainedModel,
    plan: LayerPlan,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    distill: DistillConfig | None,
    then: EmulatorStage | None = None,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
) -> PreparedEmulator:
    """Distil (if `distill`) then train the stage `then` (if given) on `emulator` in place.

    With `cache`, the trained middle layers are stored in the user cache directory under a key of the
    LLM's weights, the plan, the settings, the texts and the seed, and reused by later runs.
    """
    pair = EmulatorPair(llm, emulator, plan)
    settings, client_layers = (then.settings, then.client_layers) if then is not None else (None, None)
    path = _cache_path(llm, plan, texts, distill, settings, seed, client_layers) if cache else None
    history: dict[str, list[dict[str, float]]] = {}
    if path is not None and path.is_file():
        _load_middle(pair, path)
        history = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        return PreparedEmulator(model=emulator, history=history, from_cache=True)
    if distill is not None:
        if path is not None and then is not None:  # the distilled stage is itself cached (OT-distilled)
            earlier = prepare_emulator(
                llm, emulator, plan, tokenizer, texts, distill=distill, seed=seed, cache=True, progress=progress
            )
            history.update(earlier.history)
        else:
            history["distill"] = distill_emulator(pair, tokenizer, texts, distill, seed=seed, progress=progress)
    if then is not None:
        history[then.name] = then.train(pair, tokenizer, texts, seed=seed + 1, progress=progress)
    if path is not None:
        _save_middle(pair, path)
        path.with_suffix(".json").write_text(json.dumps(history))
    return PreparedEmulator(model=emulator, history=history, from_cache=False)


def _cache_path(
    llm: nn.Module,
    plan: LayerPlan,
    texts: Sequence[str],
    distill: DistillConfig | None,
    stage_settings: Any,
    seed: int,
    client_layers: Sequence[int] | None = None,
) -> Path:
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_VERSION, asdict(plan), seed]).encode())
    # Only a subset of the adapter layers changes the key, so the keys of emulators cached before it existed hold.
    if client_layers is not None and tuple(client_layers) != plan.adapter_layers:
        digest.update(json.dumps(list(client_layers)).encode())
    stage = asdict(stage_settings) if stage_settings is not None else None
    digest.update(json.dumps([asdict(distill) if distill else None, stage]).encode())
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
