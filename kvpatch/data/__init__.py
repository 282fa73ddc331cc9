"""Offline data for kvpatch's reference model and fidelity checks.

`corpus` builds a deterministic text corpus from the installed Python sources; `needle` makes and
scores synthetic key-value retrieval rows.
"""

from __future__ import annotations

from .corpus import Corpus, SourceFile, build_corpus, heldout_text, list_sources, split_of
from .needle import (
    NeedleExample,
    TrainingRow,
    make_needle_batch,
    make_needle_example,
    make_training_row,
    needle_accuracy,
    needle_grid,
    needle_predictions,
)

__all__ = [
    "Corpus",
    "NeedleExample",
    "SourceFile",
    "TrainingRow",
    "build_corpus",
    "heldout_text",
    "list_sources",
    "make_needle_batch",
    "make_needle_example",
    "make_training_row",
    "needle_accuracy",
    "needle_grid",
    "needle_predictions",
    "split_of",
]
