"""Reference models that kvpatch trains and ships itself (no model hub needed).

model, tokenizer = kvpatch.models.load()          # the shipped "kvpatch-ref"
model, tokenizer = kvpatch.models.load("/path/to/trained/dir")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import KVPatchError

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



def load_named(name: str, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a CLI-style name: a shipped model, `tiny-llama` (random, for smoke
    runs), or a local directory the trainer wrote."""
    if name == "tiny-llama":
        from ..testing import tiny_model, tiny_tokenizer

        return tiny_model("llama"), tiny_tokenizer()
    if name in available() or Path(name).is_dir():
        return load(name, device=device)
    raise KVPatchError(
        f"unknown model {name!r}: expected one of {available() + ['tiny-llama']} or a local model directory"
    )


__all__ = [
    "DEFAULT_NAME",
    "load_named",
    "ReferenceModelMissingError",
    "available",
    "heldout_perplexity",
    "heldout_text",
    "load",
    "model_dir",
    "perplexity",
    "training_report",
]
