"""Overhead of the lossless kvpatch patch: patched vs unpatched, side by side in one run.

Times prefill and per-token decode (greedy, through the cache) for the same model, alternating
patched and unpatched on every repeat so drift hits both alike; reports medians and the ratio.
Eager, and optionally with the decoder torch.compile'd in both variants.

    python tools/bench_overhead.py --shape llama-tiny --device cpu --out results/overhead-cpu.json
    python tools/bench_overhead.py --shape llama-1b --device cuda --dtype bf16 --compile \
        --out results/overhead-h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
import transformers
from tqdm import tqdm

import kvpatch
from kvpatch.compat import cache_kwarg, output_cache
from kvpatch.testing import BENCH_SHAPES, bench_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(model: torch.nn.Module, ids: torch.Tensor, decode_steps: int, device: str) -> dict[str, float]:
    """One prefill and `decode_steps` one-token steps; seconds for the prefill, mean per decode step."""
    state: dict[str, Any] = {}

    def prefill() -> None:
        state["out"] = model(input_ids=ids, use_cache=True)

    def decode() -> None:
        out, name = state["out"], cache_kwarg(model)
        for _ in range(decode_steps):
            next_ids = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=next_ids, use_cache=True, **{name: output_cache(out)})

    with torch.inference_mode():
        prefill_s = _timed(prefill, device)
        decode_s = _timed(decode, device) / decode_steps
    return {"prefill_ms": prefill_s * 1e3, "decode_ms": decode_s * 1e3}


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = bench_model(args.shape, args.device, DTYPES[args.dtype])
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab - 1, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    config: dict[str, Any] = {"name": "default", "description": "lossless default for the overhead benchmark"}
    if args.compile:
        config["compile"] = {"enabled": True}
        model.base_model.compile()  # the unpatched variant is compiled too: compare compiled with compiled

    def set_variant(patched: bool) -> None:
        is_patched = kvpatch.get_handle(model) is not None
        if patched and not is_patched:
            kvpatch.apply(model, config)  # compiles the decoder itself when the config says so
        elif not patched and is_patched:
            kvpatch.unpatch(model)
            if args.compile:
                model.base_model.compile()

    samples: dict[str, list[dict[str, float]]] = {"unpatched": [], "patched": []}
    for variant in ("unpatched", "patched"):  # warm-up (and compile) both, untimed
        set_variant(variant == "patched")
        for _ in range(args.warmup):
            measure(model, ids, args.decode_steps, args.device)
    for repeat in tqdm(range(args.repeats), desc=f"{args.shape} {args.device}", file=sys.stderr):
        order = ("unpatched", "patched") if repeat % 2 == 0 else ("patched", "unpatched")
        for variant in order:
            set_variant(variant == "patched")
            samples[variant].append(measure(model, ids, args.decode_steps, args.device))

    summary: dict[str, Any] = {}
    for variant, rows in samples.items():
        summary[variant] = {k: statistics.median(r[k] for r in rows) for k in ("prefill_ms", "decode_ms")}
    for key in ("prefill_ms", "decode_ms"):
        summary[f"{key.removesuffix('_ms')}_overhead_pct"] = 100 * (
            summary["patched"][key] / summary["unpatched"][key] - 1
        )
    return {
        "benchmark": "overhead",
        "shape": args.shape,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "compiled": args.compile,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "kvpatch": kvpatch.__version__},
        "samples": samples,
        **summary,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(BENCH_SHAPES), default="llama-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder in both variants")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    result = run(args)
    line = (
        f"{args.shape} {args.device} {args.dtype} compiled={args.compile}: "
        f"prefill {result['unpatched']['prefill_ms']:.3f} -> {result['patched']['prefill_ms']:.3f} ms "
        f"({result['prefill_overhead_pct']:+.2f}%), decode/token {result['unpatched']['decode_ms']:.3f} -> "
        f"{result['patched']['decode_ms']:.3f} ms ({result['decode_overhead_pct']:+.2f}%)"
    )
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
