"""Artefacts the server hands to clients (an emulator, a proxy): weights + spec, without pickle.

The weights travel as an ArrayRecord, the architecture config and tokenizer as JSON bytes; the client
rebuilds the model from those alone and keeps a safetensors copy in its work directory, so later
rounds need no re-transfer. Tied weights (embedding = LM head) are sent once.

A process that loads the same stored artefact again (a warm client, round after round) gets a copy
of the model it built before instead of rebuilding it from disk: the copy is keyed by the
directory and the artefact's content hash, written with the artefact, so a new hand-out is never
mistaken for an old one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from blindtune.models.compact import MlpChannels, shrink_mlps
from blindtune.models.device import place
from blindtune.models.loading import LoadedModel

_WEIGHTS = "artefact.safetensors"
_SPEC = "artefact_spec.json"
_HASH = "artefact.sha256"

# (directory, content hash) -> the model built from it; one entry per directory, the latest.
_built: dict[tuple[Path, str], LoadedModel] = {}


@dataclass
class ArtefactSpec:
    """Everything but the weights: `config` is the HF config JSON, `tokenizer` the tokenizer.json text,
    `mlp_channels` the MLP channels a compact hand-out kept (`blindtune.models.compact`; none: full)."""

    config: str
    tokenizer: str
    special_tokens: dict[str, str]
    mlp_channels: MlpChannels = field(default_factory=MlpChannels)

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config,
                "tokenizer": self.tokenizer,
                "special_tokens": self.special_tokens,
                "mlp_channels": self.mlp_channels.to_json(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ArtefactSpec:
        data = json.loads(text)
        channels = MlpChannels.from_json(data["mlp_channels"]) if "mlp_channels" in data else MlpChannels()
        return cls(data["config"], data["tokenizer"], data["special_tokens"], channels)


def unique_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (tied embeddings) kept once, under its first name."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        unique[name] = tensor
    return unique


def describe(loaded: LoadedModel, mlp_channels: MlpChannels | None = None) -> ArtefactSpec:
    tokenizer = loaded.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("artefacts need a fast (Rust) tokenizer to serialise as JSON")
    special = {
        key: str(value)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (value := getattr(tokenizer, key, None)) is not None
    }
    config = loaded.model.config.to_json_string()
    return ArtefactSpec(config, backend.to_str(), special, mlp_channels or MlpChannels())


def build_from_parts(spec: ArtefactSpec, tensors: dict[str, torch.Tensor]) -> LoadedModel:
    config_data = json.loads(spec.config)
    config = AutoConfig.for_model(config_data.pop("model_type"), **config_data)
    model = AutoModelForCausalLM.from_config(config)
    shrink_mlps(model, spec.mlp_channels)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    untied_missing = [name for name in missing if not _is_tied_copy(model, name, tensors)]
    if untied_missing or unexpected:
        raise ValueError(f"artefact weights do not fit its config: missing {untied_missing}, unexpected {unexpected}")
    place(model)  # the handed-out model computes where this party computes
    model.eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec.tokenizer), **spec.special_tokens)
    return LoadedModel(model=model, tokenizer=tokenizer, name="artefact")


def _is_tied_copy(model: PreTrainedModel, name: str, tensors: dict[str, torch.Tensor]) -> bool:
    pointer = model.state_dict()[name].data_ptr()
    return any(model.state_dict()[other].data_ptr() == pointer for other in tensors if other in model.state_dict())


def content_hash(spec: ArtefactSpec, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the spec and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(spec.to_json().encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_artefact(directory: Path, spec: ArtefactSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically store an artefact (weights as safetensors, spec as JSON, then their content hash)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _HASH).unlink(missing_ok=True)  # until the new hash is written, nothing matches a built copy
    digest = content_hash(spec, tensors)
    for name, write in (
        (_WEIGHTS, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p)),
        (_SPEC, lambda p: Path(p).write_text(spec.to_json())),
        (_HASH, lambda p: Path(p).write_text(digest)),
    ):
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(handle)
        write(temporary)
        os.replace(temporary, directory / name)


def stored_mlp_channels(directory: Path) -> MlpChannels:
    """The MLP channels the stored artefact kept of the LLM's (empty: not a compact hand-out)."""
    return ArtefactSpec.from_json((directory / _SPEC).read_text()).mlp_channels


def has_artefact(directory: Path) -> bool:
    return (directory / _WEIGHTS).is_file() and (directory / _SPEC).is_file()


def load_artefact(directory: Path) -> LoadedModel:
    """The stored artefact as a model of its own (the caller may train it in place)."""
    if not has_artefact(directory):
        raise FileNotFoundError(f"no artefact in {directory}: the server's setup message was not received")
    hash_file = directory / _HASH
    key = (directory.resolve(), hash_file.read_text()) if hash_file.is_file() else None
    if key is None or key not in _built:
        built = build_from_parts(
            ArtefactSpec.from_json((directory / _SPEC).read_text()), load_file(directory / _WEIGHTS)
        )
        if key is None:  # stored before artefacts had a hash: never kept
            return built
        for stale in [k for k in _built if k[0] == key[0]]:
            del _built[stale]
        _built[key] = built
    kept = _built[key]
    return LoadedModel(model=copy.deepcopy(kept.model), tokenizer=kept.tokenizer, name=kept.name)
