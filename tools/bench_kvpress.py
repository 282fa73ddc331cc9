"""kvpatch's eviction scorers against NVIDIA kvpress presses, same model, same budgets, same protocol.

Model: the shipped reference model (kvpatch-ref, 11M-param Llama, float32, CPU). Both sides get
identical examples and budgets (keep 50 / 25 / 12.5% of the context; kvpress
`compression_ratio` = fraction removed = 0.5 / 0.75 / 0.875).

Needle: make_needle_batch(context_tokens=1024, depth in 0.05/0.25/0.5/0.75/0.95, n=8, seed=0).
Per example the context (input_ids[:-query_length]) is prefilled WITH compression, the question
(last query_length ids) goes through the compressed cache, then greedy decode of
len(answer_ids)+2 tokens; correct iff needle.is_correct(decoded, example).

Perplexity: 8 windows of 1024 held-out tokens; the first 768 are prefilled with compression, the
last 256 are scored in one teacher-forced forward through the compressed cache; reported as
exp(mean NLL) compressed / exp(mean NLL) full cache.

kvpress: `with press(model): model(context)` then question/decoding outside the press with
explicit position_ids (positions continue from the uncompressed context length, as
kvpress.pipeline does). kvpatch: kvpatch.apply(model, cfg), which evicts after every forward
(the question forward too, to the ratio of all tokens seen).

Needs kvpress (transformers < 5.3), e.g. in a separate venv:
  python -m venv --system-site-packages /tmp/kvpv && /tmp/kvpv/bin/pip install "transformers>=5.0,<5.3" kvpress
  /tmp/kvpv/bin/python tools/bench_kvpress.py --out results/kvpress-cpu.json --plot docs/kvpress.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.data import needle
from bench_eviction import eviction_config  # tools/ is on sys.path when run as a script

DEPTHS = [0.05, 0.25, 0.5, 0.75, 0.95]
BUDGETS = [0.5, 0.25, 0.125]  # fraction KEPT
KVPATCH_SCORERS = ["streaming", "snapkv", "tova", "key_norm", "h2o", "hybrid"]
PRESSES = ["StreamingLLMPress", "SnapKVPress", "TOVAPress", "KnormPress", "ObservedAttentionPress",
           "ExpectedAttentionPress"]
EAGER_PRESSES = {"ObservedAttentionPress"}


# ---------------------------------------------------------------- the two ways to run a request
# A runner takes (model, context_ids [B, C], follow_ids [B, F], n_decode) and returns
# (logits of the follow forward [B, F, V], greedy ids [B, n_decode] continuing after follow).

@torch.no_grad()
def run_plain(model, context, follow, n_decode, prefill_ctx=None, positions=False):
    """Prefill `context` (inside `prefill_ctx` if given), then feed `follow` and decode outside it.
    With positions=True, position_ids are passed explicitly from the uncompressed length (kvpress:
    its compressed DynamicCache reports the compressed length)."""
    kwarg = cache_kwarg(model)
    c_len, f_len = context.shape[1], follow.shape[1]
    ctx = prefill_ctx() if prefill_ctx is not None else _null()
    with ctx:
        out = model(input_ids=context, use_cache=True, logits_to_keep=1)  # prefill logits unused
    cache = output_cache(out)
    extra = {}
    if positions:
        extra["position_ids"] = torch.arange(c_len, c_len + f_len).unsqueeze(0).expand(context.shape[0], -1)
    out = model(input_ids=follow, use_cache=True, **{kwarg: cache}, **extra)
    follow_logits = out.logits
    produced = []
    next_ids = out.logits[:, -1].argmax(-1)
    pos = c_len + f_len
    for i in range(n_decode):
        produced.append(next_ids)
        if i == n_decode - 1:
            break
        extra = {"position_ids": torch.full((context.shape[0], 1), pos)} if positions else {}
        out = model(input_ids=next_ids[:, None], use_cache=True, **{kwarg: output_cache(out)}, **extra)
        pos += 1
        next_ids = out.logits[:, -1].argmax(-1)
    ids = torch.stack(produced, 1) if produced else follow.new_zeros((follow.shape[0], 0))
    return follow_logits, ids


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------- the protocol

def needle_groups(tokenizer, n: int) -> list[dict[str, Any]]:
    filler = needle.encode(tokenizer, kvpatch.models.reference.heldout_text())
    groups = []
    for depth in DEPTHS:
        examples = needle.make_needle_batch(tokenizer, filler, context_tokens=1024, depth=depth, n=n, seed=0)
        by_q: dict[tuple[int, int], list] = {}
        for ex in examples:  # batch rows of equal query length and answer length (no padding)
            by_q.setdefault((ex.query_length, len(ex.answer_ids)), []).append(ex)
        for (q, a), exs in by_q.items():
            ids = torch.tensor([ex.input_ids for ex in exs])
            groups.append({"depth": depth, "examples": exs, "context": ids[:, :-q], "question": ids[:, -q:],
                           "n_decode": a + 2})
    return groups


def ppl_windows(tokenizer, n_windows: int, window: int = 1024) -> torch.Tensor:
    ids = needle.encode(tokenizer, kvpatch.models.reference.heldout_text())
    if len(ids) < n_windows * window:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {n_windows} x {window}")
    return torch.tensor(ids[: n_windows * window]).view(n_windows, window)


def evaluate(model, tokenizer, groups, windows, runner: Callable, ppl_batch: int = 4) -> dict[str, Any]:
    correct = {d: 0 for d in DEPTHS}
    total = {d: 0 for d in DEPTHS}
    for g in groups:
        _, new_ids = runner(model, g["context"], g["question"], g["n_decode"])
        for ex, row in zip(g["examples"], new_ids.tolist()):
            total[g["depth"]] += 1
            correct[g["depth"]] += bool(needle.is_correct(tokenizer.decode(row), ex))
    per_depth = {str(d): correct[d] / total[d] for d in DEPTHS}
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], ppl_batch):
        w = windows[start : start + ppl_batch]
        logits, _ = runner(model, w[:, :768], w[:, 768:], 0)
        # the logits at position t predict token t+1: score tokens 769..1023 from the follow forward
        lp = logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(lp.reshape(-1, lp.shape[-1]), w[:, 769:].reshape(-1),
                                                 reduction="sum").item()
        count += w[:, 769:].numel()
    return {"needle_by_depth": per_depth, "needle_mean": sum(per_depth.values()) / len(per_depth),
            "mean_nll": nll / count}


def load_models():
    from transformers import AutoModelForCausalLM

    model, tokenizer = kvpatch.models.load("kvpatch-ref", dtype=torch.float32)
    eager = AutoModelForCausalLM.from_pretrained(kvpatch.models.reference.model_dir("kvpatch-ref"),
                                                 local_files_only=True, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, eager, tokenizer


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods: dict[str, list] = {}
    for r in report["rows"]:
        if "error" not in r:
            methods.setdefault(f"{r['side']}:{r['method']}", []).append(r)
    colors = plt.get_cmap("tab10").colors
    for name, rows in methods.items():
        rows = sorted(rows, key=lambda r: r["budget"])
        side, method = name.split(":", 1)
        pairs = KVPATCH_SCORERS if side == "kvpatch" else PRESSES
        color = colors[pairs.index(method) % 10] if method in pairs else None
        style = "-" if side == "kvpatch" else "--"
        b = [r["budget"] for r in rows]
        kw = {"marker": "o" if side == "kvpatch" else "s", "label": name, "color": color}
        left.plot(b, [r["ppl_ratio"] for r in rows], style, **kw)
        right.plot(b, [r["needle_mean"] for r in rows], style, **kw)
    right.axhline(report["full_cache"]["needle_mean"], color="black", linestyle=":", label="full cache")
    for ax, label in ((left, "perplexity ratio vs full cache"), (right, "needle accuracy (1024 tokens)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of context kept")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    left.set_yscale("log")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("kvpatch-ref (CPU): kvpatch scorers (solid) vs kvpress presses (dashed, same colour = paired)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--per-depth", type=int, default=8)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    parser.add_argument("--scorers", nargs="+", default=KVPATCH_SCORERS)
    parser.add_argument("--presses", nargs="+", default=PRESSES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-from", type=Path, help="reuse full-cache numbers from an earlier report (same protocol)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    try:
        import kvpress
        kvpress_version = getattr(kvpress, "__version__", None)
        if kvpress_version is None:
            from importlib.metadata import version
            kvpress_version = version("kvpress")
    except ImportError:
        kvpress, kvpress_version = None, None

    start = time.perf_counter()
    model, eager, tokenizer = load_models()
    groups = needle_groups(tokenizer, args.per_depth)
    windows = ppl_windows(tokenizer, args.ppl_windows)
    report: dict[str, Any] = {
        "model": "kvpatch-ref", "dtype": "float32", "device": "cpu", "threads": args.threads,
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
        "kvpress": kvpress_version, "kvpatch": getattr(kvpatch, "__version__", None),
        "protocol": {"needle_context_tokens": 1024, "depths": DEPTHS, "per_depth": args.per_depth, "seed": 0,
                     "ppl_windows": args.ppl_windows, "ppl_prefill": 768, "ppl_scored": 255,
                     "budgets_kept": args.budgets},
        "rows": [],
    }

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    if args.full_from is not None:
        full = json.loads(args.full_from.read_text())["full_cache"]
    else:
        full = evaluate(model, tokenizer, groups, windows, run_plain)
    report["full_cache"] = full
    save()

    # budget-major, kvpatch scorer next to its closest press, so a partial run still compares
    jobs = []
    for b in args.budgets:
        for i in range(max(len(args.scorers), len(args.presses))):
            if i < len(args.scorers):
                jobs.append(("kvpatch", args.scorers[i], b))
            if kvpress is not None and i < len(args.presses):
                jobs.append(("kvpress", args.presses[i], b))
    for side, method, budget in tqdm(jobs, desc="method x budget"):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"side": side, "method": method, "budget": budget}
        try:
            if side == "kvpatch":
                kvpatch.apply(model, eviction_config(method, budget))
                try:
                    res = evaluate(model, tokenizer, groups, windows, run_plain)
                finally:
                    kvpatch.unpatch(model)
                base = full
            else:
                press = getattr(kvpress, method)(compression_ratio=1.0 - budget)
                m = eager if method in EAGER_PRESSES else model
                base = full  # eager and sdpa attention agree to float32 rounding

                def runner(mm, c, f, n, press=press):
                    return run_plain(mm, c, f, n, prefill_ctx=lambda: press(mm), positions=True)

                res = evaluate(m, tokenizer, groups, windows, runner)
            row.update(res)
            row["ppl_ratio"] = math.exp(res["mean_nll"] - base["mean_nll"])
        except Exception as exc:  # record and go on: one broken method must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            tqdm.write(f"{side}:{method}@{budget}: {row['error']}")
        row["seconds"] = time.perf_counter() - t0
        report["rows"].append(row)
        save()
    report["wall_s"] = time.perf_counter() - start
    save()
    if args.plot is not None:
        plot(report, args.plot)

    hdr = f"{'side':8s} {'method':24s} {'kept':>6s} {'ppl ratio':>9s} {'needle':>6s}  " + " ".join(
        f"d{d:<5g}" for d in DEPTHS)
    print(hdr)
    print(f"{'full':8s} {'(no compression)':24s} {1.0:6.3f} {1.0:9.4f} {full['needle_mean']:6.3f}  " + " ".join(
        f"{full['needle_by_depth'][str(d)]:<6.2f}" for d in DEPTHS))
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['side']:8s} {r['method']:24s} {r['budget']:6.3f}  ERROR {r['error'][:80]}")
            continue
        print(f"{r['side']:8s} {r['method']:24s} {r['budget']:6.3f} {r['ppl_ratio']:9.4f} {r['needle_mean']:6.3f}  "
              + " ".join(f"{r['needle_by_depth'][str(d)]:<6.2f}" for d in DEPTHS))
    print(f"wall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
