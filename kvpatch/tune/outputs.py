"""What `kvpatch tune --out DIR` writes, each file atomically: tune.json (every trial, the
frontier, the chosen config and its harness numbers, how the search ran), frontier.md,
frontier.png, and chosen.yaml (validated, with a header saying how and on what it was chosen)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ..config import load_config
from ..files.atomic import write_bytes_atomic, write_text_atomic
from .frontier import front, markdown_table, plot_png
from .objectives import Floor, MemoryTarget
from .search import SearchResult, Trial, describe_budget


def points(search: SearchResult, target: MemoryTarget, floor: Floor) -> list[dict[str, Any]]:
    """One summary per measured candidate, from its deepest trial."""
    rows = []
    for trial in search.deepest():
        r = trial.row
        rows.append({
            "label": trial.candidate.label, "family": trial.candidate.family, "rung": trial.rung,
            "budget": describe_budget(search.rungs[trial.rung]), "kv_fraction": r["kv_fraction"],
            "kv_bytes": r["kv_bytes_patched"], "kv_bytes_full": r["kv_bytes_unpatched"], "ppl_ratio": r["ppl_ratio"],
            "needle": r["needle_acc_patched"], "needle_unpatched": r["needle_acc_unpatched"],
            "logit_cosine": r["logit_cosine_min"], "top1": r["top1_agreement"], "target_ok": target.met(r),
            "violations": floor.violations(r), "floor_ok": not floor.violations(r),
        })
    return rows


def target_fraction(target: MemoryTarget, search: SearchResult) -> float:
    """The target as a fraction of the full cache (a byte target divided by the measured full size)."""
    if target.fraction is not None:
        return target.fraction
    full = next((t.row["kv_bytes_unpatched"] for t in search.deepest()), 0)
    return target.limit / full if full else float("nan")


def header(chosen: Trial, search: SearchResult, target: MemoryTarget, floor: Floor, meta: Mapping[str, Any]) -> str:
    """The chosen YAML's comment: the data, target, floor, how it was picked and its numbers."""
    r, top = chosen.row, search.rungs[-1]
    measured = sum(1 for rung in search.trials for t in rung if t.result is not None)
    lines = [
        f"Chosen by `kvpatch tune` ({meta['started']}, kvpatch {meta['kvpatch_version']}):",
        f"  {meta['command']}",
        f"model: {meta['model']} ({meta['dtype']}, {meta['device']})",
        f"data: {meta['data']}",
        f"memory target: {target.describe()}, measured after the decode check "
        f"({top.decode_prompt_tokens}+{top.decode_steps} tokens)",
        f"quality floor: {floor.describe()}",
        f"how: the lowest ppl ratio among the last rung's configs that meet target and floor; "
        f"{len(search.trials[0])} sampled from {meta['space_size']} in families {', '.join(meta['families'])}, "
        f"successive halving (eta {meta['eta']}, {len(search.rungs)} rungs, {measured} harness runs, "
        f"{search.wall_s:.0f} s); last rung: {describe_budget(top)}",
        f"numbers (last rung): resident K/V {r['kv_bytes_patched']:,} bytes = {r['kv_fraction']:.3f} of "
        f"{r['kv_bytes_unpatched']:,}; ppl ratio {r['ppl_ratio']:.4f}; needle {r['needle_acc_patched']:.2f} "
        f"(unpatched {r['needle_acc_unpatched']:.2f}); worst-step logit cosine {r['logit_cosine_min']:.4f}; "
        f"top-1 agreement {r['top1_agreement']:.3f}",
        "all trials: tune.json beside this file",
    ]
    return "".join(f"# {line}\n" for line in lines)


def chosen_config(chosen: Trial, target: MemoryTarget, floor: Floor, name: str) -> dict[str, Any]:
    """The chosen candidate as a config dict whose declared fidelity bounds are the floor."""
    candidate = chosen.candidate
    return candidate.config(name, f"Tuned by kvpatch tune for {target.describe()} and floor {floor.describe()}: "
                                  f"{candidate.label}", floor.fidelity(candidate.lossless()))


def chosen_yaml(chosen: Trial, search: SearchResult, target: MemoryTarget, floor: Floor, meta: Mapping[str, Any],
                name: str) -> str:
    """The chosen config as YAML under its header comment; validated before it is returned."""
    text = header(chosen, search, target, floor, meta) + yaml.safe_dump(
        chosen_config(chosen, target, floor, name), sort_keys=False, width=100)
    load_config(yaml.safe_load(text))
    return text


def write_outputs(out: Path, search: SearchResult, chosen: Trial | None, target: MemoryTarget, floor: Floor,
                  meta: Mapping[str, Any], name: str = "tuned") -> dict[str, Path]:
    """Write the search's files into `out`; chosen.yaml only when a config was chosen (validated
    before it is written)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = points(search, target, floor)
    label = chosen.candidate.label if chosen is not None else None
    paths = {"json": out / "tune.json", "table": out / "frontier.md", "plot": out / "frontier.png"}
    document = {
        "meta": dict(meta), "target": asdict(target), "floor": floor.to_dict(),
        "rungs": [asdict(s) for s in search.rungs], "skipped": search.skipped, "wall_s": search.wall_s,
        "frontier": [p["label"] for p in front(rows)], "points": rows,
        "chosen": None if chosen is None else {"label": label, "config": chosen_config(chosen, target, floor, name),
                                               "result": chosen.row},
        "trials": [t.to_dict() for rung in search.trials for t in rung],
    }
    write_text_atomic(paths["json"], json.dumps(document, indent=1))
    write_text_atomic(paths["table"], markdown_table(rows, label))
    title = f"kvpatch tune: {meta['model']}, {target.describe()}, floor {floor.describe()}"
    write_bytes_atomic(paths["plot"], plot_png(rows, label, target_fraction(target, search), floor.to_dict(), title))
    if chosen is not None:
        paths["yaml"] = out / "chosen.yaml"
        write_text_atomic(paths["yaml"], chosen_yaml(chosen, search, target, floor, meta, name))
    return paths
