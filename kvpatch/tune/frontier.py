"""The memory / quality Pareto frontier of a search: ranks, the markdown table and the plot.

Works on plain point dicts (`outputs.points`: one per candidate, its deepest measurement), so
the frontier can be redrawn from a search's JSON without torch. Both axes are minimised: resident
K/V fraction and perplexity ratio.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any


def pareto_ranks(pairs: Sequence[tuple[float, float]]) -> list[int]:
    """Non-dominated sorting with both coordinates minimised: 0 for the front, 1 for the front
    of what is left, ... A NaN coordinate ranks last."""
    clean = [(x, y) if x == x and y == y else (float("inf"), float("inf")) for x, y in pairs]
    ranks = [-1] * len(clean)
    level = 0
    while -1 in ranks:
        left = [i for i, r in enumerate(ranks) if r == -1]
        front = [i for i in left if not any(_dominates(clean[j], clean[i]) for j in left if j != i)]
        for i in front:
            ranks[i] = level
        level += 1
    return ranks


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def front(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The points that meet the floor and no other such point beats on both axes, by memory."""
    ok = [p for p in points if p["floor_ok"]]
    ranks = pareto_ranks([(p["kv_fraction"], p["ppl_ratio"]) for p in ok])
    return sorted((p for p, r in zip(ok, ranks, strict=True) if r == 0), key=lambda p: p["kv_fraction"])


_COLUMNS = ("config", "rung", "kv frac", "KV bytes", "ppl ratio", "needle", "logit cos", "top1", "target", "floor")


def markdown_table(points: Sequence[Mapping[str, Any]], chosen: str | None) -> str:
    """The frontier's rows (then every other point) as a markdown table; the chosen config is bold."""
    on_front = {p["label"] for p in front(points)}
    ordered = sorted(points, key=lambda p: (p["label"] not in on_front, p["kv_fraction"], p["ppl_ratio"]))
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
    for p in ordered:
        name = f"**{p['label']}** (chosen)" if p["label"] == chosen else p["label"]
        if p["label"] in on_front:
            name += " (frontier)"
        cells = [name, f"{p['rung'] + 1}", f"{p['kv_fraction']:.3f}", f"{p['kv_bytes']:,}", f"{p['ppl_ratio']:.4f}",
                 f"{p['needle']:.2f}", f"{p['logit_cosine']:.4f}", f"{p['top1']:.3f}",
                 "ok" if p["target_ok"] else "over", "ok" if p["floor_ok"] else "; ".join(p["violations"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _y_range(values: Sequence[float], key: str) -> tuple[float, float]:
    """An axis around the frontier and the floor, so that far-off points do not flatten it."""
    finite = [v for v in values if v == v] or [1.0]
    span = max(max(finite) - min(finite), 0.02)
    if key == "ppl_ratio":
        return min(finite) - 0.5 * span, max(finite) + 2.0 * span
    return min(finite) - 2.0 * span, min(1.0 + 0.1 * span, max(finite) + 0.5 * span)


def plot_png(points: Sequence[Mapping[str, Any]], chosen: str | None, target_fraction: float,
             floor: Mapping[str, float | None], title: str) -> bytes:
    """Two panels against resident K/V fraction: ppl ratio (with the frontier line) and worst-step
    logit cosine; the memory target and the floor as dashed lines, the chosen config starred,
    each point's colour the rung it reached. PNG bytes (the caller writes them atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = sorted({p["rung"] for p in points})
    colours = plt.get_cmap("viridis")
    line = front(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    panels = (("ppl_ratio", "perplexity ratio patched / unpatched", floor.get("max_ppl_ratio")),
              ("logit_cosine", "worst-step logit cosine", floor.get("min_logit_cosine")))
    for ax, (key, label, bound) in zip(axes, panels, strict=True):
        low, high = _y_range([p[key] for p in line] + ([bound] if bound is not None else []), key)
        for rung in rungs:
            shown = [p for p in points if p["rung"] == rung]
            ys = [min(max(p[key], low), high) for p in shown]  # far-off points sit on the edge, as triangles
            marks = ["^" if p[key] > high else "v" if p[key] < low else "o" for p in shown]
            for marker in set(marks):
                ax.scatter([p["kv_fraction"] for p, m in zip(shown, marks) if m == marker],
                           [y for y, m in zip(ys, marks) if m == marker], s=18, alpha=0.8, marker=marker,
                           color=colours(rung / max(1, len(rungs) - 1)),
                           label=f"reached rung {rung + 1}" if marker == marks[0] else None)
        if line:
            ax.plot([p["kv_fraction"] for p in line], [p[key] for p in line], color="black", linewidth=0.9,
                    label="frontier (floor met; ppl vs memory)")
        for p in points:
            if p["label"] == chosen:
                ax.scatter([p["kv_fraction"]], [p[key]], marker="*", s=220, color="red", zorder=5, label="chosen")
        ax.axvline(target_fraction, color="red", linestyle="--", linewidth=0.8, label="memory target")
        if bound is not None:
            ax.axhline(bound, color="gray", linestyle="--", linewidth=0.8, label="floor")
        ax.set_xlabel("resident K/V (fraction of the full cache)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(low, high)
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{title}\n(triangles: points beyond the axis, drawn at its edge)", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
