"""Reference models that kvpatch trains and ships itself (no model hub needed).

model, tokenizer = kvpatch.models.load()          # the shipped "kvpatch-ref"
model, tokenizer = kvpatch.models.load("/path/to/trained/dir")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import KVPatchError
from .folder import DTYPES, load_folder, missing_parts, parse_dtype
from .reference import (
    DEFAULT_NAME,
    ReferenceModelMissingError,
    available,
    heldout_perplexity,
    heldout_text,
    load,
    model_dir,
    perplexity,
    training_report,
)


def load_named(name: str, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a CLI-style name: a shipped model, `tiny-llama` (random, for smoke
    runs), or any local model directory transformers loads; `dtype` is a `folder.DTYPES` name
    (None: float32 on CPU, bfloat16 on accelerators)."""
    if name == "tiny-llama":
        from ..testing import tiny_model, tiny_tokenizer

        model = tiny_model("llama")
        chosen = parse_dtype(dtype)
        if isinstance(chosen, torch.dtype):
            model = model.to(chosen)
        return model.to(device or "cpu"), tiny_tokenizer()
    if name in available() or Path(name).is_dir():
        return load(name, device=device, dtype=dtype)
    raise KVPatchError(
        f"unknown model {name!r}: expected one of {available() + ['tiny-llama']} or a local model directory"
    )


__all__ = [
    "DEFAULT_NAME",
    "DTYPES",
    "load_folder",
    "load_named",
    "missing_parts",
    "ReferenceModelMissingError",
    "available",
    "heldout_perplexity",
    "heldout_text",
    "load",
    "model_dir",
    "perplexity",
    "training_report",
]
