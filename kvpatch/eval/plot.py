"""Fidelity-vs-memory scatter: where each config sits on the quality / K/V-size trade-off."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def _fraction(result: dict[str, Any]) -> float:
    """K/V bytes held as a fraction of the unpatched DynamicCache's (1.0 = no saving)."""
    base = result.get("kv_bytes_unpatched") or 0
    return result["kv_bytes_patched"] / base if base else float("nan")


def _y_range(values: Sequence[float]) -> tuple[float, float]:
    """At least [0.9, 1.02], so that 1 - 1e-13 does not fill the axis with rounding noise."""
    finite = [v for v in values if v == v]
    return min([0.9, *finite]) - 0.02, 1.02


def plot_fidelity_vs_memory(results: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Save a two-panel scatter (logit cosine, needle accuracy) against K/V fraction, one labelled
    point per config; `results` are `EvalResult.to_dict()` rows (or their JSON files, loaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("logit_cosine_min", "worst-step logit cosine"),
        ("needle_acc_patched", "needle accuracy"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 4), constrained_layout=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        placed: list[tuple[float, float]] = []
        for result in results:
            x, y = _fraction(result), result[key]
            ax.scatter([x], [y])
            # Labels of nearby points are stacked instead of overprinting each other.
            stacked = sum(1 for px, py in placed if abs(px - x) < 0.1 and abs(py - y) < 0.02)
            placed.append((x, y))
            ax.annotate(result["config"], (x, y), textcoords="offset points", xytext=(5, -3 + 10 * stacked), fontsize=8)
        if key == "needle_acc_patched" and results:
            base = results[0]["needle_acc_unpatched"]
            ax.axhline(base, linestyle="--", linewidth=0.8, color="gray", label="unpatched")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("K/V bytes held (fraction of unpatched)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.15)
        ax.set_ylim(*_y_range([r[key] for r in results]))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(True, alpha=0.3)
    fig.suptitle("kvpatch fidelity vs memory")
    fig.savefig(path, dpi=120)
    plt.close(fig)
