"""Fused Triton decode attention vs bf16 SDPA vs dequantize-then-SDPA, on the GPU.

Parts (all by default):
- copy: the device's copy bandwidth (bytes read + written by a large device-to-device copy), the
  ceiling every decode-attention figure is compared with.
- sweep: tile / warps / pipeline stages / split-count variants of the fused kernel at B=1 and B=8, T=32K.
- grid: decode attention time, Llama-3-8B heads (32 q / 8 kv, d=128, Tq=1), contexts 4K..128K,
  batch 1..32 (B*T <= 1M tokens): bf16 SDPA (flash, enable_gqa) on the original K/V, the fused
  kernel on KIVI int4 / int2 (group 32, fp16 scale+zero, 4 sinks + 124 residual tokens in bf16),
  and dequantize-then-SDPA (the torch path, eager decode). Achieved bandwidth = bytes the kernel
  must read (packed codes + scales + zeros + dense parts + q + out) / time. Inputs rotate over
  enough copies (> 256 MB) that L2 never holds them.
- encode: KIVI quantize-and-pack, Triton vs torch, for an appended block and a prefill.
- e2e: decode tokens/s of a 1B-shaped Llama (bf16, random init) at long context: full cache vs
  kivi4 (torch path) vs kivi4/kivi2 with the fused kernel; and torch.compile(fullgraph=True).
- fibquant: the fused kernel over FibQuant codes (config `fibquant`) vs bf16 SDPA and decode + SDPA.
- profile: torch.profiler of an eager decode step, full cache vs kivi4 fused (where the time goes).
- graph: the same model, eager decode vs one CUDA-graph replay per step (kvpatch.CudaGraphDecoder):
  full cache in transformers' StaticCache vs the static KIVI layer (`capacity_tokens`) + fused kernel.

  python tools/bench_kernels.py --out $OUT/kernels-h100.json
  python tools/bench_kernels.py --plot-from results/kernels-h100.json --plot docs/kernels.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, DIM, GROUP, SINKS, RESIDUAL = 32, 8, 128, 32, 4, 124
ROTATE_BYTES = 256 << 20


#: "graph": calls replayed from a CUDA graph (GPU time only: a small decode-attention call is
#: otherwise bound by its Python + launch cost, ~0.1-0.2 ms, and run-to-run CPU noise);
#: "events": plain launches timed with CUDA events (what an eager caller sees).
TIMER = {"mode": "events"}


def bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds (triton.testing.do_bench or do_bench_cudagraph, see TIMER)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if TIMER["mode"] == "graph":
        fn()  # compile / autotune outside the capture
        return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth() -> dict[str, float]:
    """Always with events: one large copy has no launch cost to hide (under graph replays it
    measured 2.43 instead of 3.00 TB/s)."""
    from triton.testing import do_bench

    src = torch.randn(1 << 29, device="cuda", dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = float(do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median"))
    return {"bytes": 2 * src.nbytes, "ms": ms, "tb_per_s": 2 * src.nbytes / ms / 1e9}


def kivi(bits: int):
    from kvpatch.config import StageConfig

    return StageConfig(kind="quantizer", impl="kivi", params={"bits": bits, "group_size": GROUP}).build()


def make_inputs(batch: int, tokens: int, bits_list: list[int], seed: int) -> dict[str, Any]:
    """Random K/V (a few outlier channels, like real keys), its bf16 form and KIVI forms."""
    from kvpatch.kernels.packed import PackedKV
    from kvpatch.kernels.triton_quantize import kivi_encode

    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, KV_HEADS, tokens, DIM)
    k = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    k[..., ::16] *= 4
    v = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    q = torch.randn(batch, Q_HEADS, 1, DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    quantized = tokens - SINKS - RESIDUAL
    packed = {}
    for bits in bits_list:
        part = slice(SINKS, SINKS + quantized)
        codes = [kivi_encode(x[:, :, part], role, bits, GROUP) for x, role in ((k, "key"), (v, "value"))]
        packed[bits] = PackedKV(k[:, :, SINKS + quantized:].contiguous(), v[:, :, SINKS + quantized:].contiguous(),
                                k[:, :, :SINKS].contiguous(), v[:, :, :SINKS].contiguous(), *codes, kivi(bits),
                                kivi(bits).decode)
    return {"q": q, "k": k, "v": v, "packed": packed}


def packed_bytes(kv: Any) -> int:
    dense = [kv.keys, kv.values, kv.sink_keys, kv.sink_values]
    return sum(t.nbytes for t in dense) + kv.key_codes.nbytes() + kv.value_codes.nbytes()


def rotating(sets: list[Any], fn: Callable[[Any], Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def call() -> Any:
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(sets[state["i"]])

    return call


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, scale=DIM**-0.5, enable_gqa=True)


def time_point(batch: int, tokens: int, bits_list: list[int], tuning: dict[int, dict[str, int]],
               with_dequant: bool) -> dict[str, Any]:
    from kvpatch.kernels import math_attention
    from kvpatch.kernels.decode_tuning import DecodeTuning
    from kvpatch.kernels.triton_decode import decode_attention

    kv_bytes = 2 * batch * KV_HEADS * tokens * DIM * 2
    copies = max(1, min(8, math.ceil(ROTATE_BYTES / kv_bytes)))
    sets = [make_inputs(batch, tokens, bits_list, seed) for seed in range(copies)]
    qo_bytes = 2 * sets[0]["q"].nbytes
    row: dict[str, Any] = {"batch": batch, "tokens": tokens, "copies": copies}
    ms = bench(rotating(sets, lambda s: sdpa(s["q"], s["k"], s["v"])))
    row["sdpa_bf16"] = {"ms": ms, "bytes": kv_bytes + qo_bytes, "tb_per_s": (kv_bytes + qo_bytes) / ms / 1e9}
    for bits in bits_list:
        nbytes = packed_bytes(sets[0]["packed"][bits]) + qo_bytes
        knobs = tuning.get(bits, {})
        ms = bench(rotating(sets, lambda s, b=bits, k=knobs: decode_attention(s["q"], s["packed"][b], DIM**-0.5, tuning=DecodeTuning(**k))))
        entry = {"ms": ms, "bytes": nbytes, "tb_per_s": nbytes / ms / 1e9, "speedup_vs_sdpa": row["sdpa_bf16"]["ms"] / ms}
        s = sets[0]
        fused = decode_attention(s["q"], s["packed"][bits], DIM**-0.5, tuning=DecodeTuning(**knobs))[:2].double()
        keys, values = (t[:2].double() for t in s["packed"][bits].dense())
        ref = math_attention(s["q"][:2].double(), keys, values, None, DIM**-0.5)[0]
        entry["rel_error_vs_fp64_dequantized"] = ((fused - ref).norm() / ref.norm()).item()
        entry["nan"] = bool(fused.isnan().any())
        if with_dequant:
            entry["dequant_sdpa_ms"] = bench(rotating(sets, lambda s, b=bits: sdpa(s["q"], *s["packed"][b].dense())))
        row[f"int{bits}"] = entry
        del keys, values, ref
    return row


def sweep(points: list[tuple[int, int]], bits_list: list[int], block_ns: list[int], warps: list[int],
          stages: list[int], score_joins: list[int | None] = (None,), maxnregs: list[int | None] = (None,),
          split_policies: list[str] = ("cover4", "cover8", "cover16")) -> dict[str, Any]:
    """Each knob combination on each point; the best (least total time) per bit width.
    `score_joins` / `maxnregs`: None = decode_attention's default (the knob is left out);
    `split_policies`: decode_attention's `split_policy` values (the split count per point)."""
    from kvpatch.kernels import triton_decode
    from kvpatch.kernels.decode_tuning import DecodeTuning

    variants = [{"block_n": bn, "num_warps": w, "num_stages": st} for bn in block_ns for w in warps for st in stages]
    variants = [{**v, **({"score_join": bool(j)} if j is not None else {}), **({"maxnreg": r} if r is not None else {})}
                for v in variants for j in score_joins for r in maxnregs]
    results: dict[str, Any] = {"points": points, "variants": []}
    times: dict[tuple[int, int, int], list[float]] = {}
    for batch, tokens in points:
        copies = max(1, min(8, math.ceil(ROTATE_BYTES / (2 * batch * KV_HEADS * tokens * DIM * 2))))
        sets = [make_inputs(batch, tokens, bits_list, seed) for seed in range(copies)]
        for bits in bits_list:
            for index, variant in enumerate(variants):
                for policy in split_policies:
                    knobs = dict(variant, split_policy=policy)
                    try:
                        ms = bench(rotating(sets, lambda s, b=bits, k=knobs: triton_decode.decode_attention(
                            s["q"], s["packed"][b], DIM**-0.5, tuning=DecodeTuning(**k))))
                    except Exception as err:  # noqa: BLE001 - e.g. too much shared memory: not a candidate
                        print(f"sweep: {knobs} int{bits} skipped: {str(err)[:120]}", flush=True)
                        ms = math.inf
                    times.setdefault((bits, index, policy), []).append(ms)
        del sets
        torch.cuda.empty_cache()
    best: dict[int, dict[str, int]] = {}
    for bits in bits_list:
        candidates = [(sum(ms), index, scale) for (b, index, scale), ms in times.items() if b == bits]
        for _, index, scale in candidates:
            results["variants"].append({"bits": bits, **variants[index], "split_policy": scale,
                                        "ms": times[(bits, index, scale)]})
        total, index, scale = min(candidates)
        best[bits] = dict(variants[index], split_policy=scale)
        results[f"best_int{bits}"] = {**variants[index], "split_policy": scale, "total_ms": total}
    results["chosen"] = {str(b): v for b, v in best.items()}
    return results


def encode_part() -> list[dict[str, Any]]:
    from kvpatch.kernels.triton_quantize import kivi_encode

    rows = []
    for batch, tokens, label in ((8, 32, "append block, B=8"), (1, 32768, "prefill 32K, B=1")):
        x = torch.randn(batch, KV_HEADS, tokens, DIM, device="cuda", dtype=torch.bfloat16)
        for bits in (4, 2):
            quantizer = kivi(bits)
            torch_ms = bench(lambda q=quantizer, x=x: (q.encode(x, "key"), q.encode(x, "value")))
            triton_ms = bench(lambda b=bits, x=x: (kivi_encode(x, "key", b, GROUP), kivi_encode(x, "value", b, GROUP)))
            same = all(torch.equal(kivi_encode(x, role, bits, GROUP).tensors[n], quantizer.encode(x, role).tensors[n])
                       for role in ("key", "value") for n in ("packed", "scale", "zero"))
            rows.append({"case": label, "bits": bits, "torch_ms": torch_ms, "triton_ms": triton_ms, "bitwise_equal": same})
    return rows


def e2e_configs() -> dict[str, Any]:
    def quantized(bits: int, kernel: str) -> dict[str, Any]:
        return {"name": f"kivi{bits}-{kernel}", "fidelity": {"lossless": False}, "kernels": {"attention": kernel},
                "stages": [{"kind": "quantizer", "impl": "kivi", "params": {"bits": bits, "group_size": GROUP}},
                           {"kind": "storage", "impl": "quantized", "params": {"residual_length": 128, "sink_tokens": 4}}]}

    return {"full (default, sdpa)": "default", "kivi4 (torch: dequantize + sdpa)": quantized(4, "sdpa"),
            "kivi4 fused triton": quantized(4, "triton"), "kivi2 fused triton": quantized(2, "triton")}


def prefill(model: Any, cache: Any, ids: torch.Tensor, chunk: int = 4096) -> Any:
    """Feed `ids` into `cache` in chunks (long contexts); the last chunk's output."""
    from kvpatch.compat import cache_kwarg

    for begin in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, begin : begin + chunk], use_cache=True, logits_to_keep=1,
                    **{cache_kwarg(model): cache})
    return out


@torch.no_grad()
def e2e_part(batches: list[int], context: int, steps: int) -> list[dict[str, Any]]:
    import kvpatch
    from kvpatch.compat import cache_kwarg
    from kvpatch.testing import bench_model

    model = bench_model("llama-1b", device="cuda", dtype=torch.bfloat16)
    kwarg = cache_kwarg(model)
    rows = []
    for name, config in e2e_configs().items():
        handle = kvpatch.apply(model, config)
        for batch in batches:
            ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
            cache = handle.new_cache()
            out = prefill(model, cache, ids)
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kwarg: cache})
                token = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            ms = 1e3 * statistics.median(times[4:])
            rows.append({"config": name, "batch": batch, "context": context, "decode_ms": ms,
                         "tokens_per_s": batch * 1e3 / ms, "kv_bytes": handle.stats()["kv_bytes_total"]})
            print(f"e2e {name:34s} B={batch:2d} T={context}: {ms:7.2f} ms/step  {batch * 1e3 / ms:8.1f} tok/s", flush=True)
            del cache, out
            handle.release_cache()
        kvpatch.unpatch(model)
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def compile_part(context: int) -> dict[str, Any]:
    """torch.compile(fullgraph=True) of one decode step under the fused config."""
    import kvpatch
    from kvpatch.compat import cache_kwarg
    from kvpatch.testing import bench_model

    model = bench_model("llama-1b", device="cuda", dtype=torch.bfloat16)
    handle = kvpatch.apply(model, e2e_configs()["kivi4 fused triton"])
    kwarg = cache_kwarg(model)
    cache = handle.new_cache()
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kwarg: cache})
    step = torch.compile(lambda token: model(input_ids=token, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits,
                         fullgraph=True)
    token = ids[:, -1:]
    try:
        start = time.perf_counter()
        step(token)
        return {"fullgraph": True, "compile_s": time.perf_counter() - start}
    except Exception as err:  # noqa: BLE001 - the failure is the measurement
        return {"fullgraph": False, "error": f"{type(err).__name__}: {str(err)[:3000]}",
                "kvpatch_frames": [line for line in traceback.format_exc().splitlines() if "kvpatch/" in line][-6:]}


@torch.no_grad()
def fibquant_part(points: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Fused decode over FibQuant codes (the `fibquant` config: 4-dim blocks, 8-bit indices,
    2.125 bits/element with the norm) vs bf16 SDPA and vs decode-then-SDPA, same data."""
    from kvpatch.config import StageConfig, load_config
    from kvpatch.kernels import math_attention
    from kvpatch.kernels.packed import PackedKV
    from kvpatch.kernels.triton_decode import decode_attention

    params = load_config("fibquant").stages[0].params
    quantizer = StageConfig(kind="quantizer", impl="fibquant", params=params).build()
    rows = []
    for batch, tokens in points:
        kv_bytes = 2 * batch * KV_HEADS * tokens * DIM * 2
        sets = []
        for seed in range(max(1, min(4, math.ceil(ROTATE_BYTES / kv_bytes)))):
            data = make_inputs(batch, tokens, [], seed)
            k, v, quantized = data["k"], data["v"], tokens - SINKS - RESIDUAL
            part = slice(SINKS, SINKS + quantized)
            codes = [quantizer.encode(x[:, :, part], role) for x, role in ((k, "key"), (v, "value"))]
            data["packed"] = PackedKV(k[:, :, SINKS + quantized:].contiguous(), v[:, :, SINKS + quantized:].contiguous(),
                                      k[:, :, :SINKS].contiguous(), v[:, :, :SINKS].contiguous(), *codes, quantizer,
                                      quantizer.decode)
            sets.append(data)
        qo_bytes = 2 * sets[0]["q"].nbytes
        nbytes = packed_bytes(sets[0]["packed"]) + qo_bytes
        row: dict[str, Any] = {"batch": batch, "tokens": tokens, "bytes": nbytes,
                               "bits_per_element": sets[0]["packed"].key_codes.bits_per_element()}
        row["sdpa_bf16_ms"] = bench(rotating(sets, lambda s: sdpa(s["q"], s["k"], s["v"])))
        row["fused_ms"] = bench(rotating(sets, lambda s: decode_attention(s["q"], s["packed"], DIM**-0.5)))
        row["decode_sdpa_ms"] = bench(rotating(sets, lambda s: sdpa(s["q"], *s["packed"].dense())))
        row["tb_per_s"] = nbytes / row["fused_ms"] / 1e9
        row["speedup_vs_sdpa"] = row["sdpa_bf16_ms"] / row["fused_ms"]
        s = sets[0]
        fused = decode_attention(s["q"], s["packed"], DIM**-0.5)[:2].double()
        keys, values = (t[:2].double() for t in s["packed"].dense())
        ref = math_attention(s["q"][:2].double(), keys, values, None, DIM**-0.5)[0]
        row["rel_error_vs_fp64_decoded"] = ((fused - ref).norm() / ref.norm()).item()
        print(f"fibquant B={batch} T={tokens}: sdpa {row['sdpa_bf16_ms']:.4f} ms, fused {row['fused_ms']:.4f} ms "
              f"({row['tb_per_s']:.2f} TB/s, {row['speedup_vs_sdpa']:.2f}x), decode+sdpa {row['decode_sdpa_ms']:.3f} ms, "
              f"rel err {row['rel_error_vs_fp64_decoded']:.1e}", flush=True)
        rows.append(row)
        del sets, keys, values, ref
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def profile_part(context: int, batch: int = 1) -> dict[str, str]:
    """Where an eager decode step's time goes (torch.profiler, 3 steps after a 32K prefill): the
    full cache's eager step costs ~60 ms at any batch, far above its bytes; this names the ops."""
    from torch.profiler import ProfilerActivity, profile

    import kvpatch
    from kvpatch.compat import cache_kwarg
    from kvpatch.testing import bench_model

    model = bench_model("llama-1b", device="cuda", dtype=torch.bfloat16)
    kwarg = cache_kwarg(model)
    tables = {}
    for name in ("full (default, sdpa)", "kivi4 fused triton"):
        handle = kvpatch.apply(model, e2e_configs()[name])
        ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
        cache = handle.new_cache()
        out = prefill(model, cache, ids)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            model(input_ids=token, use_cache=True, logits_to_keep=1, **{kwarg: cache})
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model(input_ids=token, use_cache=True, logits_to_keep=1, **{kwarg: cache})
            torch.cuda.synchronize()
        averages = prof.key_averages()
        tables[name] = {"by_device_time": averages.table(sort_by="cuda_time_total", row_limit=15),
                        "by_cpu_time": averages.table(sort_by="cpu_time_total", row_limit=15)}
        print(f"profile {name}\n{tables[name]['by_device_time']}", flush=True)
        del cache, out
        handle.release_cache()
        kvpatch.unpatch(model)
        torch.cuda.empty_cache()
    return tables


def _static_config(bits: int, capacity: int) -> dict[str, Any]:
    return {"name": f"kivi{bits}-graph", "fidelity": {"lossless": False}, "kernels": {"attention": "triton"},
            "stages": [{"kind": "quantizer", "impl": "kivi", "params": {"bits": bits, "group_size": GROUP}},
                       {"kind": "storage", "impl": "quantized",
                        "params": {"residual_length": 128, "sink_tokens": 4, "capacity_tokens": capacity}}]}


@torch.no_grad()
def graph_part(batches: list[int], context: int, steps: int) -> list[dict[str, Any]]:
    """Decode step time, eager vs one CUDA-graph replay per token (kvpatch.CudaGraphDecoder), for
    the full cache (transformers' StaticCache, unpatched model) and the static KIVI layer with the
    fused kernel; graph and eager greedy tokens compared from two identical prefills."""
    from transformers import StaticCache

    import kvpatch
    from kvpatch.testing import bench_model

    model = bench_model("llama-1b", device="cuda", dtype=torch.bfloat16)
    capacity = context + 3 * steps + 64
    # the full cache last: a device-side assert there would poison the CUDA context for the rest
    configs: dict[str, Any] = {"kivi4 static, fused": _static_config(4, capacity),
                               "kivi2 static, fused": _static_config(2, capacity), "full (StaticCache, sdpa)": None}
    rows = []
    for name, config in configs.items():
        handle = kvpatch.apply(model, config) if config is not None else None
        for batch in batches:
            ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")

            def prefilled() -> Any:
                cache = handle.new_cache() if handle else StaticCache(config=model.config, max_cache_len=capacity)
                prefill(model, cache, ids[:, :-1])
                return cache

            row: dict[str, Any] = {"config": name, "batch": batch, "context": context}
            try:
                tokens, timing = {}, {}
                for use_graph in (False, True):
                    cache = prefilled()
                    decoder = kvpatch.CudaGraphDecoder(model, cache)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    tokens[use_graph] = decoder.decode(ids[:, -1], context - 1, steps, use_graph=use_graph).clone()
                    torch.cuda.synchronize()
                    timing[use_graph] = 1e3 * (time.perf_counter() - start) / steps
                    if use_graph:  # steady state: replays only
                        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        begin.record()
                        for _ in range(steps):
                            decoder.graph.replay()
                        end.record()
                        torch.cuda.synchronize()
                        timing["replay"] = begin.elapsed_time(end) / steps
                    del decoder, cache
                    torch.cuda.empty_cache()
                agree = (tokens[True] == tokens[False]).float().mean().item()
                differs = (tokens[True] != tokens[False]).any(0).nonzero()
                # random-init bf16 logits are near-ties: one flipped argmax changes everything after it
                row["first_divergent_step"] = int(differs[0]) if len(differs) else None
                row.update(eager_ms=timing[False], graph_ms=timing["replay"], graph_first_call_ms=timing[True],
                           tokens_per_s_eager=batch * 1e3 / timing[False], tokens_per_s_graph=batch * 1e3 / timing["replay"],
                           graph_equals_eager=bool(torch.equal(tokens[True], tokens[False])), token_agreement=agree)
                print(f"graph {name:26s} B={batch:2d} T={context}: eager {timing[False]:7.2f} ms/step, graph "
                      f"{timing['replay']:7.2f} ms/step ({batch * 1e3 / timing['replay']:8.1f} tok/s), tokens equal "
                      f"{row['graph_equals_eager']} ({agree:.3f})", flush=True)
            except Exception as err:  # noqa: BLE001 - a failure to capture is the measurement
                row["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
                row["frames"] = traceback.format_exc().splitlines()[-12:]
                print(f"graph {name} B={batch}: {row['error'][:400]}", flush=True)
            rows.append(row)
        if handle:
            kvpatch.unpatch(model)
    return rows


def table(results: dict[str, Any]) -> str:
    copy = results["copy"]["tb_per_s"]
    header = "".join(f" | {f'int{b} ms':>8} {'TB/s':>5} {'%copy':>5} {'x':>5} {'deq':>7}" for b in (4, 2))
    lines = [f"copy bandwidth {copy:.2f} TB/s", f"{'B':>3} {'T':>7} {'sdpa ms':>8} {'TB/s':>5}{header}"]
    for r in results.get("grid", []):
        cells = [f"{r['batch']:>3} {r['tokens']:>7} {r['sdpa_bf16']['ms']:8.4f} {r['sdpa_bf16']['tb_per_s']:5.2f}"]
        for bits in (4, 2):
            e = r.get(f"int{bits}")
            if e:
                cells.append(f"{e['ms']:8.4f} {e['tb_per_s']:5.2f} {100 * e['tb_per_s'] / copy:5.1f} "
                             f"{e['speedup_vs_sdpa']:5.2f} {e.get('dequant_sdpa_ms', float('nan')):7.3f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path, copy_ceiling: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy = copy_ceiling or results["copy"]["tb_per_s"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch, marker in zip(sorted({r["batch"] for r in results["grid"]}), "os^Dv"):
        rows = [r for r in results["grid"] if r["batch"] == batch]
        tokens = [r["tokens"] for r in rows]
        for key, color in (("sdpa_bf16", "tab:gray"), ("int4", "tab:blue"), ("int2", "tab:green")):
            axes[0].plot(tokens, [r[key]["ms"] for r in rows], marker=marker, color=color,
                         label=f"{key} B={batch}" if batch in (1, 8) else None, alpha=0.8)
            axes[1].plot(tokens, [r[key]["tb_per_s"] for r in rows], marker=marker, color=color, alpha=0.8,
                         label=f"{key}" if batch == 1 else None)
    axes[1].axhline(copy, color="black", ls="--", label=f"copy {copy:.2f} TB/s")
    axes[1].axhline(0.85 * copy, color="red", ls=":", label="85% of copy")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("decode attention ms (32 q / 8 kv heads, d=128)")
    axes[1].set_ylabel("TB/s on the bytes read")
    timer = "GPU time, CUDA-graph replays" if results.get("timer") == "graph" else "CUDA events"
    fig.suptitle(f"H100: fused KIVI decode vs bf16 SDPA ({timer}; markers: batch "
                 f"{sorted({r['batch'] for r in results['grid']})})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["copy", "sweep", "grid", "encode", "e2e", "compile", "graph"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="largest batch x context in the grid")
    parser.add_argument("--e2e-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--e2e-context", type=int, default=32768)
    parser.add_argument("--sweep-block-n", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--sweep-warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--sweep-stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--sweep-score-join", type=int, nargs="+", default=[None], choices=[0, 1],
                        help="KIVI loop variant(s): 0 per-field softmax, 1 joined score tile (default: the kernel's)")
    parser.add_argument("--sweep-splits", nargs="+", default=["cover4", "cover8", "cover16"],
                        help="decode_attention split_policy values: coverN (N programs per SM) or waveN (one wave)")
    parser.add_argument("--sweep-maxnreg", type=int, nargs="+", default=[None],
                        help="register caps per thread (0 = none; default: the kernel's, 168 at 4 warps)")
    parser.add_argument("--timer", choices=["events", "graph"], default="events",
                        help="kernel timings from plain launches (events) or CUDA-graph replays (GPU time only)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--plot-from", type=Path, help="only plot (and print) an existing results file")
    parser.add_argument("--copy-ceiling", type=float, help="TB/s of the ceiling line (default: the file's copy figure)")
    args = parser.parse_args()
    if args.plot_from:
        results = json.loads(args.plot_from.read_text())
        print(table(results))
        if args.plot:
            plot(results, args.plot, args.copy_ceiling)
        return
    TIMER["mode"] = args.timer
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timer": args.timer}
    import triton

    results["triton"] = triton.__version__

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    results["copy"] = copy_bandwidth()
    print(f"copy {results['copy']['tb_per_s']:.3f} TB/s", flush=True)
    tuning: dict[int, dict[str, int]] = {}
    if "sweep" in args.parts:
        results["sweep"] = sweep([(1, 32768), (8, 32768)], [4, 2], args.sweep_block_n, args.sweep_warps, args.sweep_stages,
                                 args.sweep_score_join, args.sweep_maxnreg, args.sweep_splits)
        tuning = {int(b): v for b, v in results["sweep"]["chosen"].items()}
        print("sweep best", {k: v for k, v in results["sweep"].items() if k.startswith("best")}, flush=True)
        save()
    if "grid" in args.parts:
        time_point(1, 4096, [4, 2], tuning, with_dequant=False)  # warm-up: the first point ran slow (clocks)
        results["tuning"] = {str(b): v for b, v in tuning.items()}
        results["grid"] = []
        for batch in args.batches:
            for tokens in args.contexts:
                if batch * tokens <= args.max_tokens:
                    results["grid"].append(time_point(batch, tokens, [4, 2], tuning, with_dequant=batch * tokens <= 1 << 19))
                    torch.cuda.empty_cache()
            save()
        print(table(results), flush=True)
    if "encode" in args.parts:
        results["encode"] = encode_part()
        print(json.dumps(results["encode"], indent=0), flush=True)
        save()
    if "e2e" in args.parts:
        results["e2e"] = e2e_part(args.e2e_batches, args.e2e_context, steps=24)
        save()
    if "compile" in args.parts:
        results["compile"] = compile_part(4096)
        print("compile", results["compile"], flush=True)
        save()
    if "fibquant" in args.parts:
        results["fibquant"] = fibquant_part([(1, 32768), (8, 32768), (1, 131072)])
        save()
    if "profile" in args.parts:
        results["profile"] = profile_part(args.e2e_context)
        save()
    if "graph" in args.parts:
        results["graph"] = graph_part(args.e2e_batches, args.e2e_context, steps=48)
        save()
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
