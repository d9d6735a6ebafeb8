"""Model loading and layer surgery shared by every method."""

from blindtune.models.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelLoadError,
    load_model,
    load_tokenizer,
    tiny_model,
)

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "load_model", "load_tokenizer", "tiny_model"]
