"""Time to first token with chunk reuse, against full prefill and against the floor.

For each prompt length and reuse ratio (the share of the prompt whose chunks are already stored):
- `full`:    the unpatched model's prefill of the whole prompt;
- `floor`:   prefill of the uncached suffix only with the prefix K/V already on the device, plus
             the time to copy the prefix K/V from pinned host memory (where the store keeps it);
- `kvpatch`: the patched model (`prefix_reuse`: 128-token chunks, store in pinned RAM) on the
             whole prompt: lookup, copies, suffix prefill and write-back of the new chunks;
- `kvboost`: the `kvboost` package on the same model and text, if installed (`--kvboost`).
Every reuse request has a fresh random suffix, so the suffix is never cached. Times are medians
of `--repeats` after warm-up, with the device synchronised; a first-call time is kept too.

`--miss-breakdown` adds, per length, where a request that finds nothing stored spends its time
(each variant side by side in the run): the lossless `default` config; `prefix_reuse` with the
write-back turned off; `prefix_reuse` whole; the host milliseconds of each reuse hook; and a
torch.profiler table of one miss (`--profile-dir`).

    python tools/bench_ttft.py --device cuda --out results/ttft-h100.json --plot docs/ttft.png --kvboost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.testing import bench_model

CHUNK = 128


def sync(device: torch.device) -> None:
    """Wait for the compute stream: logits are ready then. kvpatch's write-back copies run on a
    side stream and overlap whatever comes next (the next request waits for none of them)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int, setup: Callable[[], object] | None = None) -> dict:
    """First-call and median milliseconds of `fn` (after `setup`, untimed, each time)."""
    times = []
    for _ in range(repeats + 1):
        arg = setup() if setup is not None else None
        sync(device)
        start = time.perf_counter()
        fn() if arg is None else fn(arg)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"first_ms": times[0], "ms": statistics.median(times[1:])}


def prefix_cache(model: torch.nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in zip(cache.layers, kv):
        layer.update(k.clone(), v.clone())
    return cache


def measure_floor(model, base: torch.Tensor, cached: int, full: dict, repeats: int, device: torch.device) -> dict:
    """Suffix prefill over a device-resident prefix, and the host->device copy of that prefix.

    The suffix prefill is timed twice: unpatched (transformers' SDPA path, which materialises the
    causal mask of a prefill over a cache) and under kvpatch's lossless `default` config (flash
    attention with lower-right causality); the floor is the faster plus the copy."""
    if not cached:
        return {"suffix_hf_ms": full["ms"], "suffix_ms": full["ms"], "copy_ms": 0.0, "floor_ms": full["ms"]}
    with torch.no_grad():
        out = model(input_ids=base[:, :cached], use_cache=True)
    kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]
    suffix = base[:, cached:]

    def suffix_prefill(cache: DynamicCache) -> None:
        model(input_ids=suffix, **{cache_kwarg(model): cache}, logits_to_keep=1)

    hf = timed(suffix_prefill, device, repeats, setup=lambda: prefix_cache(model, kv))
    kvpatch.apply(model, "default")
    try:
        patched = timed(suffix_prefill, device, repeats, setup=lambda: prefix_cache(model, kv))
    finally:
        kvpatch.unpatch(model)
    host = torch.stack([torch.stack([k[0], v[0]]) for k, v in kv]).cpu()
    host = host.pin_memory() if device.type == "cuda" else host
    copy = timed(lambda: host.to(device, non_blocking=True), device, repeats)
    best = min(hf["ms"], patched["ms"])
    return {"suffix_hf_ms": hf["ms"], "suffix_ms": patched["ms"], "copy_ms": copy["ms"], "floor_ms": best + copy["ms"]}


def measure_kvpatch(model, base: torch.Tensor, cached: int, repeats: int, device: torch.device,
                    rand: Callable[[int], torch.Tensor]) -> dict:
    """The patched model on whole prompts: the first `cached` tokens stored, a fresh suffix each time."""
    handle = kvpatch.apply(model, "prefix_reuse")
    try:
        if cached:
            with torch.no_grad():
                model(input_ids=base[:, : max(cached, CHUNK)], logits_to_keep=1)
        host_base, length = base.cpu(), base.shape[1]

        def prompt() -> tuple[torch.Tensor, torch.Tensor]:
            ids = host_base if cached == length - 1 else torch.cat([host_base[:, :cached], rand(length - cached)], 1)
            return ids, ids.to(device)

        def request(ids: tuple[torch.Tensor, torch.Tensor]) -> None:
            handle.reuse.set_host_ids(ids[0])  # as the Engine does: hash the host copy
            model(input_ids=ids[1], logits_to_keep=1)

        ours = timed(request, device, repeats, setup=prompt)
        stats = handle.reuse.last
        return {"kvpatch_ms": ours["ms"], "kvpatch_first_ms": ours["first_ms"], "reused_tokens": stats.reused_tokens,
                "lookup_ms": stats.lookup_ms, "load_ms": stats.load_ms}
    finally:
        kvpatch.unpatch(model)


def measure_miss_breakdown(model, length: int, repeats: int, device: torch.device,
                           rand: Callable[[int], torch.Tensor], profile_dir: Path | None) -> dict:
    """A request with no stored chunk, taken apart: what each part of `prefix_reuse` adds."""
    def fresh() -> tuple[torch.Tensor, torch.Tensor]:
        ids = rand(length)
        return ids, ids.to(device)

    def profiled(run: Callable[[], object], name: str) -> None:
        """torch.profiler tables (by host and by GPU time) of one `run`, in `profile_dir`."""
        if profile_dir is None or device.type != "cuda":
            return
        profile_dir.mkdir(parents=True, exist_ok=True)
        run()
        sync(device)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            run()
            sync(device)
        averages = prof.key_averages()
        (profile_dir / f"{name}-profile-{length}.txt").write_text(
            averages.table(sort_by="self_cpu_time_total", row_limit=25) + "\n"
            + averages.table(sort_by="self_cuda_time_total", row_limit=25))

    profiled(lambda: model(input_ids=fresh()[1], logits_to_keep=1), "unpatched")
    kvpatch.apply(model, "default")
    try:
        default = timed(lambda ids: model(input_ids=ids[1], logits_to_keep=1), device, repeats, setup=fresh)
    finally:
        kvpatch.unpatch(model)
    handle = kvpatch.apply(model, "prefix_reuse")
    try:
        reuse = handle.reuse
        host_ms: dict[str, list[float]] = {"before_forward": [], "after_forward": [], "flush": []}

        def clocked(name: str, fn: Callable) -> Callable:
            def run(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    host_ms[name].append((time.perf_counter() - start) * 1e3)
            return run

        reuse.before_forward = clocked("before_forward", reuse.before_forward)
        reuse.after_forward = clocked("after_forward", reuse.after_forward)
        reuse.writer.flush = clocked("flush", reuse.writer.flush)

        def request(ids: tuple[torch.Tensor, torch.Tensor]) -> None:
            reuse.set_host_ids(ids[0])
            model(input_ids=ids[1], logits_to_keep=1)

        whole = timed(request, device, repeats, setup=fresh)
        hooks = {f"{name}_host_ms": statistics.median(v[1:]) for name, v in host_ms.items() if len(v) > 1}
        reuse._write_back = lambda request: 0  # no chunk cut, encoded or copied
        no_write = timed(request, device, repeats, setup=fresh)
        del reuse._write_back
        profiled(lambda: request(fresh()), "miss")
    finally:
        kvpatch.unpatch(model)
    return {"default_ms": default["ms"], "miss_no_writeback_ms": no_write["ms"], "miss_ms": whole["ms"], **hooks}


def measure_length(model, length: int, ratios: list[float], repeats: int, device: torch.device, vocab: int,
                   gen: torch.Generator, breakdown: bool = False, profile_dir: Path | None = None) -> list[dict]:
    def rand(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, n), generator=gen)

    base = rand(length).to(device)
    full = timed(lambda: model(input_ids=base, logits_to_keep=1), device, repeats)
    rows = []
    for ratio in ratios:
        cached = min(length - 1, int(ratio * length) // CHUNK * CHUNK) if ratio < 1 else length - 1
        row = {"length": length, "reuse": ratio, "cached_tokens": cached, "full_ms": full["ms"]}
        row.update(measure_floor(model, base, cached, full, repeats, device))
        row.update(measure_kvpatch(model, base, cached, repeats, device, rand))
        if breakdown and cached == 0:
            row.update(measure_miss_breakdown(model, length, repeats, device, rand, profile_dir))
        rows.append(row)
    return rows


def measure_kvboost(model, tokenizer, length: int, ratios: list[float], repeats: int, device: torch.device,
                    text_ids: list[int], gen: torch.Generator) -> list[dict]:
    """kvboost on text whose token count is about `length` (its own tokenization decides)."""
    from kvboost import KVBoost

    rows = []
    for ratio in ratios:
        engine = KVBoost(model, tokenizer, max_cache_bytes=8 * 2**30, chunk_size=CHUNK, device=str(device))
        offset = int(torch.randint(0, len(text_ids) - 2 * length, (1,), generator=gen))
        cached = int(ratio * length) // CHUNK * CHUNK if ratio < 1 else length
        prefix = tokenizer.decode(text_ids[offset : offset + cached])
        if cached:
            engine.warm(prefix)
        times, ttfts = [], []
        for i in range(repeats + 2):
            start = int(torch.randint(0, len(text_ids) - length, (1,), generator=gen))
            suffix = "" if ratio >= 1 else tokenizer.decode(text_ids[start : start + length - cached])
            sync(device)
            t0 = time.perf_counter()
            result = engine.generate(prefix + suffix, max_new_tokens=1)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            ttfts.append(result.ttft_ms)
        rows.append({"length": length, "reuse": ratio, "kvboost_first_ms": times[0],
                     "kvboost_ms": statistics.median(times[2:]), "kvboost_ttft_ms": statistics.median(ttfts[2:]),
                     "kvboost_reuse_ratio": getattr(result, "kv_reuse_ratio", None)})
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths), 3.2), sharey=False)
    for ax, length in zip(axes if len(lengths) > 1 else [axes], lengths):
        rs = [r for r in rows if r["length"] == length]
        x = [r["reuse"] * 100 for r in rs]
        for key, label, style in (("full_ms", "full prefill", "k--"), ("floor_ms", "floor", "g:"),
                                  ("kvpatch_ms", "kvpatch", "b-o"), ("kvboost_ms", "kvboost", "r-s")):
            points = [(xi, r[key]) for xi, r in zip(x, rs) if key in r]
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=3)
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("reuse %")
        ax.set_yscale("log")
    (axes[0] if len(lengths) > 1 else axes).set_ylabel("TTFT (ms)")
    (axes[0] if len(lengths) > 1 else axes).legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--reuse", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kvboost", action="store_true", help="also time the kvboost package (must be installed)")
    parser.add_argument("--kvboost-lengths", type=int, nargs="+", help="lengths for kvboost (default: --lengths)")
    parser.add_argument("--kvboost-reuse", type=float, nargs="+", help="reuse ratios for kvboost (default: --reuse)")
    parser.add_argument("--miss-breakdown", action="store_true",
                        help="at 0%% reuse, also time default, prefix_reuse without write-back and the hooks' host time")
    parser.add_argument("--profile-dir", type=Path, help="with --miss-breakdown: torch.profiler tables of one miss here")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = bench_model(args.shape, device=args.device, dtype=getattr(torch, args.dtype))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for length in tqdm(args.lengths, desc="kvpatch lengths"):
            rows.extend(measure_length(model, length, args.reuse, args.repeats, device, vocab, gen,
                                       args.miss_breakdown, args.profile_dir))
            print(json.dumps(rows[-len(args.reuse):]), flush=True)
    if args.kvboost:
        _, tokenizer = kvpatch.models.load("kvpatch-ref")
        text_ids = tokenizer(kvpatch.models.heldout_text()).input_ids
        while len(text_ids) < 3 * max(args.lengths):
            text_ids = text_ids + text_ids
        by_key = {(r["length"], r["reuse"]): r for r in rows}
        for length in tqdm(args.kvboost_lengths or args.lengths, desc="kvboost lengths"):
            try:
                for r in measure_kvboost(model, tokenizer, length, args.kvboost_reuse or args.reuse, args.repeats,
                                         device, text_ids, gen):
                    by_key[(r["length"], r["reuse"])].update(r)
            except Exception as err:  # noqa: BLE001  (report, keep the kvpatch results)
                print(f"kvboost failed at {length}: {type(err).__name__}: {err}", flush=True)
                break
    for r in rows:
        r["kvpatch_over_floor"] = r["kvpatch_ms"] / r["floor_ms"]
        r["kvpatch_over_full"] = r["kvpatch_ms"] / r["full_ms"]
        r["lookup_share"] = r["lookup_ms"] / r["kvpatch_ms"]
        if "kvboost_ms" in r:
            r["kvboost_over_kvpatch"] = r["kvboost_ms"] / r["kvpatch_ms"]
    header = f"{'len':>6} {'reuse':>5} {'full':>8} {'floor':>8} {'kvpatch':>8} {'/floor':>6} {'/full':>6} {'lookup%':>7} {'kvboost':>8}"
    print(header)
    for r in rows:
        print(f"{r['length']:>6} {r['reuse']:>5.2f} {r['full_ms']:>8.2f} {r['floor_ms']:>8.2f} {r['kvpatch_ms']:>8.2f} "
              f"{r['kvpatch_over_floor']:>6.2f} {r['kvpatch_over_full']:>6.2f} {100 * r['lookup_share']:>7.2f} "
              f"{r.get('kvboost_ms', float('nan')):>8.2f}")
    for r in (r for r in rows if "miss_ms" in r):
        print(f"miss {r['length']}: full {r['full_ms']:.2f}  default {r['default_ms']:.2f}  no write-back "
              f"{r['miss_no_writeback_ms']:.2f}  whole {r['miss_ms']:.2f} ms; host: before {r.get('before_forward_host_ms', 0):.2f}"
              f"  after {r.get('after_forward_host_ms', 0):.2f}  flush {r.get('flush_host_ms', 0):.2f} ms")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
            "dtype": args.dtype, "torch": torch.__version__}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
