"""Fidelity harness: how far a kvpatch config moves a model's outputs, and what it saves.

    result = kvpatch.eval.evaluate(model, tokenizer, "default", settings=EvalSettings.quick())
    result.check_bounds(kvpatch.load_config("default").fidelity)  # [] when fine

See docs/fidelity.md for what each number means.
"""

from __future__ import annotations

from .harness import EvalResult, EvalSettings, Reference, evaluate, reference_run
from .plot import plot_fidelity_vs_memory

__all__ = ["EvalResult", "EvalSettings", "Reference", "evaluate", "plot_fidelity_vs_memory", "reference_run"]
