"""Decode step time against its bandwidth floor and against HF's StaticCache graph, in one run (GPU).

For each batch B and context T, every config prefills T random tokens and then runs decode steps
through the patched model's plain forward (the call `generate` makes: input ids, position ids and
a growing attention mask, the cache; the next token fed back on the device, no host sync); steps
are timed together with CUDA events. `default_graphs` and the `*_graphs` configs replay each step
as a CUDA graph (kvpatch/patch/decode_graphs.py); `default` is the eager dynamic cache.
Baseline in the same run: the unpatched model with transformers' StaticCache, one decode step
captured in a CUDA graph and replayed (SDPA over the whole buffer with a mask).
Floor: (weight bytes + the K/V bytes the step must read) / the copy bandwidth measured here
(bytes read + written by a 1 GiB device copy).

  python tools/bench_decode.py --out $OUT/decode-h200.json
  python tools/bench_decode.py --plot-from results/decode-h200.json --plot docs/decode-h200.png
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import kvpatch
from kvpatch.compat import cache_kwarg
from kvpatch.testing import BENCH_SHAPES, bench_model

PREFILL_CHUNK = 4096


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3)


def configs(context: int, steps: int) -> dict[str, Any]:
    """The configs measured; quantized static layers need a capacity (the dense one grows)."""
    chosen: dict[str, Any] = {"default": "default", "default_graphs": "default_graphs"}
    chosen["compiled_graphs"] = "compiled_graphs"  # results/decode-h200.json names it default_graphs_compiled
    for bits in (4, 2):
        config = kvpatch.load_config("kivi4_triton").model_dump()
        config["name"] = f"kivi{bits}_graphs"
        config["stages"][0]["params"]["bits"] = bits
        config["stages"][1]["params"]["capacity_tokens"] = context + steps + 512
        config["compile"] = {"cuda_graphs": True}
        chosen[config["name"]] = config
    return chosen


def weight_bytes(model: torch.nn.Module) -> int:
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def kv_read_bytes(cache: Any, context: int) -> int:
    """K/V bytes a step at `context` tokens must read: static buffers count their valid share."""
    total = 0
    for layer in cache.layers:
        tensors = [t for t in kvpatch.cache.layer_kv_tensors(layer) if t is not None]
        stored = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())
        capacity = getattr(layer, "capacity", None) or getattr(layer, "capacity_tokens", None)
        total += stored * min(1.0, context / capacity) if capacity else stored
    return int(total)


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    name = cache_kwarg(model)
    logits = None
    for begin in range(0, ids.shape[1], PREFILL_CHUNK):
        logits = model(input_ids=ids[:, begin : begin + PREFILL_CHUNK], use_cache=True, logits_to_keep=1,
                       **{name: cache}).logits
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def time_steps(model: torch.nn.Module, cache: Any, token: torch.Tensor, context: int, steps: int,
               warmup: int = 4) -> float:
    """ms per decode step, fed the way generate feeds it (position ids, a growing mask)."""
    batch, name = token.shape[0], cache_kwarg(model)
    mask = torch.ones(batch, context + warmup + steps + 1, dtype=torch.long, device="cuda")
    position = torch.full((batch, 1), context, dtype=torch.long, device="cuda")

    def step(i: int) -> None:
        nonlocal token
        n = context + i + 1
        out = model(input_ids=token, position_ids=position + i, attention_mask=mask[:, :n], use_cache=True,
                    logits_to_keep=1, return_dict=True, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(warmup, warmup + steps):
        step(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


@torch.no_grad()
def generate_ms_per_token(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    """Decode ms per token through plain `model.generate` (greedy, a fresh cache per call, so a
    graph config captures anew): a run of `tokens` + 1 new tokens minus a run of 1 (the prefill)."""
    mask = torch.ones_like(ids)

    def run(new: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    prefill = min(run(1) for _ in range(2))
    return (run(tokens + 1) - prefill) / tokens * 1e3


def replay_only(graphs: Any, steps: int) -> float | None:
    """GPU time of the last captured step alone (the rest of ms is host work that did not
    overlap). Replays advance the device counters only: run it after the timed steps."""
    entries = list(graphs._graphs.values())
    if not entries:
        return None
    return replay_ms(entries[-1].graph, steps)


def replay_ms(graph: torch.cuda.CUDAGraph, steps: int) -> float:
    """GPU ms per replay of `graph`, over `steps` replays timed with CUDA events."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def kernel_table(graphs: Any, path: Path, replays: int = 10) -> None:
    """The kernels one replayed step runs, by GPU time (torch.profiler over `replays` replays):
    where a step's time goes beyond the bytes it must read."""
    entries = list(graphs._graphs.values())
    if not entries:
        return
    graph = entries[-1].graph
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))


def profile_steps(model: torch.nn.Module, cache: Any, token: torch.Tensor, context: int) -> None:
    """Where a replayed step's host time goes (cProfile of 20 steps, printed)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    time_steps(model, cache, token, context, 20, warmup=0)
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(22)


@torch.no_grad()
def hf_static_graph(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Unpatched model, transformers' StaticCache sized to the run, one step in a CUDA graph."""
    from transformers import StaticCache

    batch, context = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 8)
    name = cache_kwarg(model)
    takes_position = "cache_position" in __import__("inspect").signature(model.forward).parameters
    for begin in range(0, context, PREFILL_CHUNK):
        chunk = ids[:, begin : begin + PREFILL_CHUNK]
        extra = {"cache_position": torch.arange(begin, begin + chunk.shape[1], device="cuda")} if takes_position else {}
        model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{name: cache}, **extra)
    token = ids[:, -1:].clone()
    position = torch.full((batch, 1), context, dtype=torch.long, device="cuda")
    cache_position = torch.tensor([context], device="cuda")

    def step() -> None:
        extra = {"cache_position": cache_position} if takes_position else {}
        out = model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **{name: cache}, **extra)
        token.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        position.add_(1)
        cache_position.add_(1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replay_ms(graph, 2)  # warm-up
    return replay_ms(graph, steps)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    bandwidth = copy_bandwidth()
    model = bench_model(args.shape, "cuda", torch.bfloat16)
    weights = weight_bytes(model)
    rows: list[dict[str, Any]] = []
    profiled = False
    points = [(b, t) for t in args.context for b in args.batch]
    per_point = len([n for n in configs(1, 1) if not args.configs or n in args.configs]) + 1
    progress = tqdm(total=len(points) * per_point, desc="decode", file=sys.stderr)
    for batch, context in points:
        ids = torch.randint(3, BENCH_SHAPES[args.shape]["vocab_size"], (batch, context), device="cuda")
        for name, config in configs(context, args.steps).items():
            if args.configs and name not in args.configs:
                continue
            row: dict[str, Any] = {"config": name, "batch": batch, "context": context}
            try:
                handle = kvpatch.apply(model, config)
                cache = handle.new_cache()
                token = prefill(model, ids, cache)
                row["ms"] = time_steps(model, cache, token, context, args.steps)
                if args.generate:
                    row["generate_ms_per_token"] = generate_ms_per_token(model, ids, args.steps)
                row["kv_read_bytes"] = kv_read_bytes(cache, context)
                row["kv_resident_bytes"] = sum(cache.kv_bytes("resident").values())
                if handle.decode_graphs is not None:
                    row.update(handle.decode_graphs.stats())
                    if args.profile and not profiled:
                        profiled = True
                        profile_steps(model, cache, token, context + args.steps + 4)
                    row["replay_ms"] = replay_only(handle.decode_graphs, args.steps)
                    if args.kernels_dir is not None:
                        kernel_table(handle.decode_graphs, args.kernels_dir / f"kernels-{name}-b{batch}-t{context}.txt")
            except Exception as err:  # one failing point must not lose the others
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            finally:
                if kvpatch.get_handle(model) is not None:
                    kvpatch.unpatch(model)
                cache = handle = None
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(_with_floor(row, weights, bandwidth))
            progress.update()
        row = {"config": "hf_static_graph", "batch": batch, "context": context}
        try:
            row["ms"] = hf_static_graph(model, ids, args.steps)
            row["kv_read_bytes"] = 2 * _dense_kv_bytes(model, batch, context)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(_with_floor(row, weights, bandwidth))
        progress.update()
        for r in rows[-per_point:]:
            tqdm.write(json.dumps(r), file=sys.stderr)
        if args.out:  # after every point: a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(_result(args, bandwidth, weights, rows), indent=1))
    progress.close()
    return _result(args, bandwidth, weights, rows)


def _result(args: argparse.Namespace, bandwidth: float, weights: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
            "dtype": "bf16", "copy_tb_per_s": bandwidth / 1e12, "weight_bytes": weights, "steps": args.steps,
            "rows": rows}


def _dense_kv_bytes(model: torch.nn.Module, batch: int, context: int) -> int:
    """Bytes of K (or V) in bf16 for `context` tokens, all layers."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * batch * config.num_key_value_heads * context * head_dim * 2


def _with_floor(row: dict[str, Any], weights: int, bandwidth: float) -> dict[str, Any]:
    if "ms" in row and "kv_read_bytes" in row:
        row["floor_ms"] = (weights + row["kv_read_bytes"]) / bandwidth * 1e3
        row["ratio_to_floor"] = row["ms"] / row["floor_ms"]
    return row


def table(result: dict[str, Any]) -> str:
    lines = ["| config | B | T | ms/step | floor ms | x floor | vs hf_static_graph | generate ms/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["batch"], r["context"]): r.get("ms") for r in result["rows"] if r["config"] == "hf_static_graph"}
    for r in result["rows"]:
        if "floor_ms" not in r:
            measured = f"{r['ms']:.2f}, then " if "ms" in r else ""
            lines.append(f"| {r['config']} | {r['batch']} | {r['context']} | {measured}error: {r.get('error', '')[:60]} "
                         "| | | | |")
            continue
        ref = base.get((r["batch"], r["context"]))
        speedup = f"{ref / r['ms']:.2f}x" if ref else "n/a"
        lines.append(f"| {r['config']} | {r['batch']} | {r['context']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['ratio_to_floor']:.2f} | {speedup} | {r.get('generate_ms_per_token', float('nan')):.2f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ratio_to_floor" in r]
    points = sorted({(r["batch"], r["context"]) for r in rows})
    names = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r["ratio_to_floor"] for r in rows if r["config"] == name and (r["batch"], r["context"]) == p),
                       float("nan")) for p in points]
        ax.bar([j + i * width for j in range(len(points))], values, width, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(points))], [f"B={b} T={t // 1024}K" for b, t in points])
    ax.set_ylabel("decode step / bandwidth floor")
    ax.set_yscale("log")
    ax.set_title(f"{result['shape']} bf16 on {result['device']} (copy {result['copy_tb_per_s']:.2f} TB/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES), default="llama-1b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--configs", nargs="+", help="only these (default: all): " + ", ".join(configs(1, 1)))
    parser.add_argument("--generate", action="store_true", help="also time plain model.generate per token")
    parser.add_argument("--profile", action="store_true", help="cProfile the host side of one graph config")
    parser.add_argument("--kernels-dir", type=Path, help="write each graph config's kernel table (torch.profiler) here")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--plot-from", type=Path)
    args = parser.parse_args()
    result = json.loads(args.plot_from.read_text()) if args.plot_from else measure(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
