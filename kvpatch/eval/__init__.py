"""Fidelity harness: how far a kvpatch config moves a model's outputs, and what it saves.

    result = kvpatch.eval.evaluate(model, tokenizer, "default", settings=EvalSettings.quick())
    result.check_bounds(kvpatch.load_config("default").fidelity)  # [] when fine

See docs/fidelity.md for what each number means.
"""

from __future__ import annotations

from .harness import EvalResult, EvalSettings, evaluate
from .plot import plot_fidelity_vs_memory

__all__ = ["EvalResult", "EvalSettings", "evaluate", "plot_fidelity_vs_memory"]
