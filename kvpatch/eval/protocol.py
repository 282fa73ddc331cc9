"""The long-context protocol's report: per task, length and depth, each config beside the full
cache, as a table and a heatmap. Works on `EvalResult.to_dict()` dicts (or the eval-<config>.json
files `kvpatch eval --out` writes), so a report can be redrawn from saved results.

Relative score = config accuracy / full-cache accuracy on the same rows (NaN when the full cache
got none right: then the task says nothing about the config, and the table says so).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

Grid = Mapping[str, Mapping[str, float]]


def task_grids(result: Mapping[str, Any], patched: bool) -> dict[str, Grid]:
    """{task: {length: {depth: accuracy}}} of one side of a result dict, the needle first."""
    needle = result["needle_patched" if patched else "needle_unpatched"]
    return {"needle": needle, **result.get("tasks_patched" if patched else "tasks_unpatched", {})}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def relative(patched: float, full: float) -> float:
    """config / full cache; NaN when the full cache scored 0 (no signal)."""
    return patched / full if full > 0 else math.nan


def summary(result: Mapping[str, Any], length: str | None = None) -> dict[str, dict[str, float]]:
    """Per task at `length` (default: the longest measured), the mean over depths of the full cache
    and of the config, and their ratio: {task: {"full": .., "config": .., "relative": ..}}."""
    out: dict[str, dict[str, float]] = {}
    full_grids = task_grids(result, patched=False)
    for task, grid in task_grids(result, patched=True).items():
        at = length or max(grid, key=int)
        full, config = mean(list(full_grids[task][at].values())), mean(list(grid[at].values()))
        out[task] = {"full": full, "config": config, "relative": relative(config, full)}
    return out


def _cell(value: float) -> str:
    return "  n/a" if math.isnan(value) else f"{value:5.2f}"


def format_protocol_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One block per task: the full cache and each config, accuracy per length (mean over
    depths), per depth at the longest length, and the relative score at the longest length."""
    if not results:
        raise ValueError("no results to tabulate")
    blocks = []
    for task, full_grid in task_grids(results[0], patched=False).items():
        lengths = list(full_grid)
        longest = max(lengths, key=int)
        depths = list(full_grid[longest])
        header = (f"{task:<14}" + "".join(f" {'L' + n:>6}" for n in lengths) + " |"
                  + "".join(f" {'@' + d:>6}" for d in depths) + f" | rel@{longest}")
        rows = [header, _row("full cache", full_grid, lengths, depths, longest, "")]
        full_at = mean(list(full_grid[longest].values()))
        for result in results:
            grid = task_grids(result, patched=True)[task]
            rel = relative(mean(list(grid[longest].values())), full_at)
            rows.append(_row(result["config"], grid, lengths, depths, longest, _cell(rel)))
        blocks.append("\n".join(rows))
    legend = ("L<n>: mean accuracy over depths at n tokens; @<d>: accuracy at depth d of the longest length; "
              "rel: config / full cache at the longest length (n/a: the full cache got none right).")
    return "\n\n".join([*blocks, legend])


def _row(name: str, grid: Grid, lengths: list[str], depths: list[str], longest: str, rel: str) -> str:
    per_length = "".join(f" {_cell(mean(list(grid[n].values()))):>6}" for n in lengths)
    per_depth = "".join(f" {_cell(grid[longest][d]):>6}" for d in depths)
    return f"{name:<14}{per_length} |{per_depth} | {rel}".rstrip()


def plot_protocol(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """A heatmap per task: rows the full cache and each config, columns every (length, depth)
    cell, colour the accuracy (numbers printed in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot")
    tasks = task_grids(results[0], patched=False)
    names = ["full cache", *(r["config"] for r in results)]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(12, 1.2 + 0.45 * len(names) * len(tasks)), squeeze=False,
                             constrained_layout=True)
    for ax, (task, full_grid) in zip(axes[:, 0], tasks.items(), strict=True):
        cells = [(n, d) for n in full_grid for d in full_grid[n]]
        grids = [full_grid, *(task_grids(r, patched=True)[task] for r in results)]
        values = [[g[n][d] for n, d in cells] for g in grids]
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(len(cells)), [f"{n}\n@{d}" for n, d in cells], fontsize=6)
        ax.set_title(f"{task}: accuracy per length (tokens) and depth", fontsize=9)
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6, label="accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_summary(results: Sequence[Mapping[str, Any]], length: str | None = None) -> str:
    """A Markdown table, one row per config: resident K/V fraction, perplexity ratio, and per task
    the full cache's and the config's accuracy at `length` (default: the longest), with their ratio."""
    if not results:
        raise ValueError("no results to tabulate")
    tasks = list(task_grids(results[0], patched=False))
    head = "| config | K/V resident | ppl ratio | " + " | ".join(f"{t} full / config (rel)" for t in tasks) + " |"
    rows = [head, "| --- | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
    for result in results:
        cells = []
        for task, s in summary(result, length).items():
            rel = "n/a" if math.isnan(s["relative"]) else f"{s['relative']:.2f}"
            cells.append(f"{s['full']:.2f} / {s['config']:.2f} ({rel})")
        rows.append(f"| {result['config']} | {result['kv_fraction']:.3f} | {result['ppl_ratio']:.3f} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)
