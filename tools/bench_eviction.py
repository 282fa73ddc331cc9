"""Eviction and tiers on the trained reference model at budgets of 50%, 25% and 12.5%.

For each method and budget, the fidelity harness (kvpatch.eval) compares the config with the
full cache: perplexity ratio (scored tokens fed through the cache 64 at a time, so they see the
evicted / tiered cache), needle accuracy by context length and depth (the question is asked
after the context was cached and compressed), logit cosine / top-1 over teacher-forced decode
steps. The full-cache side is measured once and shared by every row.

Methods: the scorers with `evictor/budget` (keep `budget` of the tokens seen), `fixed_budget`
(hybrid truncation, half the budget by recency, evicted tokens offloaded) and `long_context`
(configs/long_context.yaml: hot / warm / cold tiers). For the tiers the budget is the
accelerator-resident K/V footprint: hot (full precision) + warm (quantized) bytes as a fraction
of the full cache in 16-bit, with a quarter of it for hot; the rest goes cold (host memory, not
attended unless promoted). Every row also reports the measured resident fraction (16-bit
equivalent) after a 1,024-token prefill and 64 decode steps.

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
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.eval import EvalSettings, evaluate, reference_run
from kvpatch.eval.harness import patched
from kvpatch.stages.tiered_layer import TieredLayer

SCORERS = ["streaming", "key_norm", "tova", "snapkv", "h2o", "hybrid"]
METHODS = [*SCORERS, "fixed_budget", "long_context"]
BUDGETS = [0.5, 0.25, 0.125]
DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Share of a tiered budget spent on full-precision (hot) tokens.
HOT_SHARE = 0.25


def eviction_config(scorer: str, ratio: float) -> dict[str, Any]:
    return {
        "name": f"{scorer}@{ratio:g}",
        "fidelity": {"lossless": False},
        "stages": [
            {"kind": "scorer", "impl": scorer},
            {"kind": "evictor", "impl": "budget", "params": {"ratio": ratio, "sink_tokens": 4, "recent_tokens": 16}},
        ],
    }


def fixed_budget_config(ratio: float) -> dict[str, Any]:
    """configs/fixed_budget.yaml with the budget as a fraction of the tokens seen."""
    config = kvpatch.load_config("fixed_budget").model_dump()
    for stage in config["stages"]:
        if stage["impl"] == "budget":
            stage["params"] = {**stage["params"], "max_tokens": None, "ratio": ratio}
    return {**config, "name": f"fixed_budget@{ratio:g}"}


def warm_bits_per_element(config: dict[str, Any]) -> float:
    """Stored bits per K/V element of the config's quantizer (KIVI: bits + fp16 scale and zero
    per group); 16 without one."""
    quantizer = next((s for s in config["stages"] if s["kind"] == "quantizer"), None)
    if quantizer is None:
        return 16.0
    if quantizer["impl"] != "kivi":
        raise ValueError(f"tier budgets: no bit rate known for quantizer/{quantizer['impl']}")
    return quantizer["params"]["bits"] + 32 / quantizer["params"]["group_size"]


def tiered_config(footprint: float) -> dict[str, Any]:
    """configs/long_context.yaml with tier budgets for a resident footprint of `footprint` of the
    16-bit full cache: a quarter for hot, the rest for warm at the quantizer's bit rate."""
    config = kvpatch.load_config("long_context").model_dump()
    hot = HOT_SHARE * footprint
    warm = (footprint - hot) * 16 / warm_bits_per_element(config)
    for stage in config["stages"]:
        if stage["impl"] == "tiered":
            stage["params"] = {**stage["params"], "hot": {"ratio": hot},
                               "warm": {"ratio": warm} if warm < 1 else {}}
    return {**config, "name": f"long_context@{footprint:g}"}


def method_config(method: str, budget: float) -> dict[str, Any]:
    if method == "fixed_budget":
        return fixed_budget_config(budget)
    if method == "long_context":
        return tiered_config(budget)
    return eviction_config(method, budget)


@torch.no_grad()
def resident_fraction(model: torch.nn.Module, config: dict[str, Any], ids: torch.Tensor, prefill: int = 1024,
                      steps: int = 64) -> dict[str, float]:
    """K/V an accelerator would hold (hot + warm; host-offloaded tokens excluded) as a fraction
    of the full cache, both in 16-bit, after `prefill` tokens and `steps` decode steps."""
    device = next(model.parameters()).device
    ids = ids[: prefill + steps].to(device)
    kwarg = cache_kwarg(model)
    with patched(model, config):
        out = model(input_ids=ids[None, :prefill], use_cache=True)
        for t in range(prefill, prefill + steps):
            out = model(input_ids=ids[None, t : t + 1], use_cache=True, **{kwarg: output_cache(out)})
        cache = output_cache(out)
        full = resident = 0.0
        tokens = {"hot": 0, "warm": 0, "cold": 0}
        for layer in cache.layers:
            batch, heads, _, dim = layer.keys.shape
            per_token = batch * heads * dim * 2 * 2  # K and V, 16-bit
            full += layer.get_seq_length() * per_token
            if isinstance(layer, TieredLayer):
                resident += layer.hot_tokens * per_token + layer.tier_bytes()["warm"]
                for tier, n in layer.tier_tokens().items():
                    tokens[tier] += n
            else:
                resident += layer.keys.shape[-2] * per_token
        layers = len(cache.layers)
    return {"resident_fraction_16bit": resident / full, **{f"{t}_tokens_per_layer": n / layers for t, n in tokens.items()}}


def by_depth(needle: dict[str, dict[str, float]]) -> dict[str, float]:
    """Needle accuracy per depth, averaged over context lengths."""
    depths = next(iter(needle.values())).keys()
    return {d: sum(row[d] for row in needle.values()) / len(needle) for d in depths}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        if not mine:
            continue
        budgets = [r["budget"] for r in mine]
        style = {"linewidth": 2.5, "color": "black"} if method == "long_context" else {}
        left.plot(budgets, [r["ppl_ratio"] for r in mine], marker="o", label=method, **style)
        right.plot(budgets, [r["needle_acc_patched"] for r in mine], marker="o", label=method, **style)
    full = rows[0]["needle_acc_unpatched"] if rows else None
    if full is not None:
        right.axhline(full, color="gray", linestyle="--", label="full cache")
    for ax, label in ((left, "perplexity ratio vs full cache"), (right, "needle accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (fraction of tokens; tiers: resident 16-bit K/V footprint)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    left.set_yscale("log")
    right.legend(fontsize=8)
    fig.suptitle("kvpatch-ref: eviction and tiers at 50 / 25 / 12.5% budgets")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def print_tables(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':13s} {'budget':>6s} {'resident':>8s} {'ppl ratio':>9s} {'needle':>11s} {'logit cos':>9s} {'top1':>5s}")
    for r in rows:
        print(f"{r['method']:13s} {r['budget']:6.3f} {r['resident_fraction_16bit']:8.3f} {r['ppl_ratio']:9.4f} "
              f"{r['needle_acc_unpatched']:5.2f}/{r['needle_acc_patched']:4.2f} {r['logit_cosine_min']:9.4f} {r['top1_agreement']:5.3f}")
    if rows:
        depths = list(rows[0]["needle_by_depth"])
        print(f"\n{'needle by depth':22s} " + " ".join(f"{d:>6s}" for d in depths))
        print(f"{'full cache':22s} " + " ".join(f"{rows[0]['needle_by_depth_full'][d]:6.2f}" for d in depths))
        for r in rows:
            print(f"{r['method'] + ' @ ' + format(r['budget'], 'g'):22s} " + " ".join(f"{r['needle_by_depth'][d]:6.2f}" for d in depths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", "--scorers", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--needle-per-cell", type=int, default=10)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    parser.add_argument("--max-minutes", type=float, help="start no new row after this long (rerun with --resume)")
    args = parser.parse_args()

    model, tokenizer = kvpatch.models.load("kvpatch-ref")
    model = model.to(args.device)
    settings = dataclasses.replace(EvalSettings.full(), ppl_max_tokens=args.ppl_tokens, needle_lengths=tuple(args.needle_lengths),
                                   needle_depths=DEPTHS, needle_per_cell=args.needle_per_cell,
                                   decode_steps=args.decode_steps, progress=False)
    start = time.perf_counter()
    reference = reference_run(model, tokenizer, settings)
    ids = reference.ids
    rows: list[dict[str, Any]] = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else []
    report: dict[str, Any] = {"device": args.device, "settings": dataclasses.asdict(settings), "rows": rows}
    done = {(r["method"], r["budget"]) for r in rows}
    jobs = [(m, b) for m in args.methods for b in args.budgets if (m, b) not in done]
    for method, budget in tqdm(jobs, desc="methods x budgets"):
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            print(f"stopping after {args.max_minutes} min; rerun with --resume for the rest")
            break
        config = kvpatch.load_config(method_config(method, budget))
        result = evaluate(model, tokenizer, config, reference=reference).to_dict()
        rows.append({"method": method, "budget": budget, **result,
                     "needle_by_depth": by_depth(result["needle_patched"]),
                     "needle_by_depth_full": by_depth(result["needle_unpatched"]),
                     **resident_fraction(model, config, ids)})
        report["wall_s"] = time.perf_counter() - start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    if args.plot is not None:
        plot(rows, args.plot)
    print_tables(rows)


if __name__ == "__main__":
    main()
