"""Reference models that kvpatch trains and ships itself (no model hub needed).

model, tokenizer = kvpatch.models.load()          # the shipped "kvpatch-ref"
model, tokenizer = kvpatch.models.load("/path/to/trained/dir")
"""

from __future__ import annotations

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

__all__ = [
    "DEFAULT_NAME",
    "ReferenceModelMissingError",
    "available",
    "heldout_perplexity",
    "heldout_text",
    "load",
    "model_dir",
    "perplexity",
    "training_report",
]
