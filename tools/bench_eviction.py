"""Eviction on the trained reference model: every scorer at budgets of 50%, 25% and 12.5%.

For each scorer and budget, the fidelity harness (kvpatch.eval) compares the evicting config
with the full cache: perplexity ratio (scored tokens fed through the cache 64 at a time, so
they see the evicted cache), needle accuracy by context length and depth (the question is asked
after the context was cached and evicted), logit cosine / top-1 over teacher-forced decode
steps. Writes JSON and a plot (perplexity ratio and needle accuracy against budget).

  python tools/bench_eviction.py --device cuda --out results/eviction-h100.json --plot docs/eviction.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import kvpatch
from kvpatch.eval import EvalSettings, evaluate

SCORERS = ["streaming", "key_norm", "tova", "snapkv", "h2o", "hybrid"]
BUDGETS = [0.5, 0.25, 0.125]


def eviction_config(scorer: str, ratio: float) -> dict[str, Any]:
    return {
        "name": f"{scorer}@{ratio:g}",
        "fidelity": {"lossless": False},
        "stages": [
            {"kind": "scorer", "impl": scorer},
            {"kind": "evictor", "impl": "budget", "params": {"ratio": ratio, "sink_tokens": 4, "recent_tokens": 16}},
        ],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for scorer in SCORERS:
        mine = sorted((r for r in rows if r["scorer"] == scorer), key=lambda r: r["budget"])
        if not mine:
            continue
        budgets = [r["budget"] for r in mine]
        left.plot(budgets, [r["ppl_ratio"] for r in mine], marker="o", label=scorer)
        right.plot(budgets, [r["needle_acc_patched"] for r in mine], marker="o", label=scorer)
    full = rows[0]["needle_acc_unpatched"] if rows else None
    if full is not None:
        right.axhline(full, color="black", linestyle="--", label="full cache")
    for ax, label in ((left, "perplexity ratio vs full cache"), (right, "needle accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV budget (fraction of tokens seen)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    left.set_yscale("log")
    right.legend(fontsize=8)
    fig.suptitle("kvpatch-ref: eviction scorers at 50 / 25 / 12.5% budgets")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scorers", nargs="+", default=SCORERS)
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--needle-per-cell", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    model, tokenizer = kvpatch.models.load("kvpatch-ref")
    model = model.to(args.device)
    settings = dataclasses.replace(EvalSettings.full(), ppl_max_tokens=args.ppl_tokens, needle_lengths=(1024, 2048),
                                   needle_per_cell=args.needle_per_cell, progress=False)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for scorer in tqdm(args.scorers, desc="scorers"):
        for budget in args.budgets:
            result = evaluate(model, tokenizer, eviction_config(scorer, budget), settings=settings).to_dict()
            rows.append({"scorer": scorer, "budget": budget, **result})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))
    report = {"device": args.device, "wall_s": time.perf_counter() - start, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    if args.plot is not None:
        plot(rows, args.plot)
    print(f"{'scorer':10s} {'budget':>6s} {'ppl ratio':>9s} {'needle':>11s} {'logit cos':>9s} {'top1':>5s} {'kv frac':>7s}")
    for r in rows:
        print(f"{r['scorer']:10s} {r['budget']:6.3f} {r['ppl_ratio']:9.4f} {r['needle_acc_unpatched']:5.2f}/{r['needle_acc_patched']:4.2f}"
              f" {r['logit_cosine_min']:9.4f} {r['top1_agreement']:5.3f} {r['kv_fraction']:7.3f}")


if __name__ == "__main__":
    main()
