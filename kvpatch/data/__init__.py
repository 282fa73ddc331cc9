"""Offline data for kvpatch's reference model and fidelity checks.

`corpus` builds a deterministic text corpus from the installed Python sources; `needle` makes and
scores synthetic key-value retrieval rows; `tasks` adds multi-key, multi-value and
variable-tracking rows (RULER-style), planted by `planting`.
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
from .tasks import TASKS, TaskExample, is_task_correct, make_task_batch, make_task_example, make_task_training_row

__all__ = [
    "Corpus",
    "TASKS",
    "TaskExample",
    "NeedleExample",
    "SourceFile",
    "TrainingRow",
    "build_corpus",
    "heldout_text",
    "is_task_correct",
    "list_sources",
    "make_needle_batch",
    "make_needle_example",
    "make_task_batch",
    "make_task_example",
    "make_task_training_row",
    "make_training_row",
    "needle_accuracy",
    "needle_grid",
    "needle_predictions",
    "split_of",
]
