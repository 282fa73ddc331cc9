"""Long-context memory and decode speed: KV bytes and decode tokens/s against context length.

A random-init Llama-3-8B-shaped model (32 layers, 32 query / 8 KV heads, head dim 128; random
weights are fine for memory and speed, never for quality) in bf16. For each config, each context
is prefilled in chunks through the cache (`logits_to_keep=1`, so no full-vocabulary logits),
then `--decode-steps` single-token steps are timed. Each config first runs a short untimed
warm-up (`--warmup` tokens in two chunks, four decode steps), so one-time costs (torch.compile
of a config's decode, first CUDA calls) stay out of the numbers. A config that runs out of memory at one
length is recorded as OOM and skipped for longer ones.

  python tools/bench_long_context.py --device cuda --out $OUT/long-context-h100.json

Tiered configs (`evictor/tiered`) also record bytes and tokens per tier (hot + warm on the
device, cold in host memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.stages.tiered_layer import TieredLayer
from kvpatch.testing import bench_model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_one(model: torch.nn.Module, handle: kvpatch.PatchHandle, context: int, chunk: int, steps: int, device: str) -> dict[str, Any]:
    kwarg = cache_kwarg(model)
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cpu").manual_seed(context)
    ids = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    cache = handle.new_cache()
    for begin in range(0, context, chunk):
        out = model(input_ids=ids[:, begin : begin + chunk], use_cache=True, logits_to_keep=1, **{kwarg: cache})
        cache = output_cache(out)
    _sync(device)
    prefill_s = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kwarg: cache})
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - start)
    decode_s = statistics.median(times[2:] if len(times) > 4 else times)
    stats = handle.stats()
    row = {
        "context": context,
        "kv_bytes": stats["kv_bytes_total"],
        "kv_bytes_by_device": stats["kv_bytes"],
        "tokens_seen": stats["tokens"],
        "prefill_s": prefill_s,
        "decode_ms": decode_s * 1e3,
        "decode_tokens_per_s": 1.0 / decode_s,
    }
    tiers = [layer for layer in cache.layers if isinstance(layer, TieredLayer)]
    if tiers:  # hot + warm are resident on the device, cold is in host memory
        row["tier_bytes"] = {t: sum(layer.tier_bytes()[t] for layer in tiers) for t in ("hot", "warm", "cold")}
        row["tier_tokens_per_layer"] = {t: sum(layer.tier_tokens()[t] for layer in tiers) / len(tiers) for t in ("hot", "warm", "cold")}
    if device == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    handle.release_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["default", "streaming", "snapkv", "tova", "kivi4"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2048, help="tokens of the untimed warm-up run (0: none)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = bench_model(args.shape, device=args.device, dtype=dtype)
    report: dict[str, Any] = {"shape": args.shape, "device": args.device, "dtype": str(dtype), "chunk": args.chunk,
                              "decode_steps": args.decode_steps, "results": {}}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for config in args.configs:
        handle = kvpatch.apply(model, config)
        if args.warmup:
            run_one(model, handle, args.warmup, args.warmup // 2, 4, args.device)
        rows: list[dict[str, Any]] = []
        for context in tqdm(args.contexts, desc=config):
            try:
                rows.append(run_one(model, handle, context, args.chunk, args.decode_steps, args.device))
            except torch.OutOfMemoryError:
                handle.release_cache()
                rows.append({"context": context, "oom": True})
                break
            finally:
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            report["results"][config] = rows
            args.out.write_text(json.dumps(report, indent=2))
        report["results"][config] = rows
        kvpatch.unpatch(model)
    args.out.write_text(json.dumps(report, indent=2))
    for config, rows in report["results"].items():
        for r in rows:
            if r.get("oom"):
                print(f"{config:10s} {r['context']:>7d}  OOM")
            else:
                print(f"{config:10s} {r['context']:>7d}  kv {r['kv_bytes'] / 2**30:7.2f} GiB  decode {r['decode_ms']:7.2f} ms "
                      f"({r['decode_tokens_per_s']:6.1f} tok/s)  prefill {r['prefill_s']:6.2f} s")


if __name__ == "__main__":
    main()
