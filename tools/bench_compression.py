"""KV compression benchmark: every quantizer on the reference model's real K/V, side by side.

Parts (each can be switched off):
  codec       On real K/V of kvpatch-ref (all 6 layers, `--windows` x `--length` tokens of
              held-out text): bits per element counting every scale, zero point, norm and
              index; K and V relative error; attention-output cosine with the model's own queries
              (the last `--queries` positions, causal over the whole window). Whole windows are
              encoded (no full-precision residual or sinks): a pure codec comparison. Baselines
              in the same run where they import: transformers' QuantizedCache (quanto backend)
              and the `turboquant` package (their ideal packed rate is counted: favourable to them).
  throughput  Encode / decode tokens/s on random K/V of `--shape`, eager and torch.compile'd.
  overhead    Encode time of one decode step's K/V for every layer of a 1B-shaped Llama, as a
              fraction of that model's dense decode step measured in the same run.
  e2e         The fidelity harness (perplexity ratio through the cache, needle accuracy) on
              deployable configs (residual window 128, 4 sink tokens).

  python tools/bench_compression.py --out results/compression-cpu.json --plot docs/compression.png
  python tools/bench_compression.py --parts throughput overhead e2e --device cuda --out $OUT/compression-h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import kvpatch
from kvpatch.config import StageConfig
from kvpatch.patch.attention import observe_attention
from kvpatch.quant import Codes, QuantizerStage

RoundTrip = Callable[[torch.Tensor, str], tuple[torch.Tensor, float]]


# -- methods --------------------------------------------------------------------------------------


def kvpatch_quantizer(impl: str, params: dict[str, Any]) -> QuantizerStage:
    stage = StageConfig(kind="quantizer", impl=impl, params=params).build()
    assert isinstance(stage, QuantizerStage)
    return stage


def kvpatch_roundtrip(impl: str, params: dict[str, Any]) -> RoundTrip:
    quantizer = kvpatch_quantizer(impl, params)

    def run(x: torch.Tensor, role: str) -> tuple[torch.Tensor, float]:
        codes = quantizer.encode(x, role)
        return quantizer.decode(codes, role, x.dtype), codes.bits_per_element()

    return run


KVPATCH_SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("kivi", "kivi", {"bits": 8, "group_size": 32}),
    ("kivi", "kivi", {"bits": 4, "group_size": 32}),
    ("kivi", "kivi", {"bits": 4, "group_size": 64}),
    ("kivi", "kivi", {"bits": 2, "group_size": 32}),
    ("kivi", "kivi", {"bits": 2, "group_size": 64}),
    ("fibquant", "fibquant", {"block_dim": 4, "code_bits": 12}),
    ("fibquant", "fibquant", {"block_dim": 4, "code_bits": 8}),
    ("fibquant", "fibquant", {"block_dim": 8, "code_bits": 12}),
    ("fibquant", "fibquant", {"block_dim": 8, "code_bits": 8}),
    ("fibquant", "fibquant", {"block_dim": 16, "code_bits": 12}),
    ("fibquant", "fibquant", {"block_dim": 16, "code_bits": 8}),
    ("fibquant", "fibquant", {"block_dim": 16, "code_bits": 4}),
    ("fibquant", "fibquant", {"block_dim": 32, "code_bits": 8}),
]


def turboquant_roundtrips(dim: int, device: str) -> dict[str, RoundTrip] | str:
    """The `turboquant` package's MSE quantizer (K and V) and its inner-product variant for keys
    (MSE at bits-1 plus 1-bit QJL), or why it does not run."""
    try:
        import numpy as np

        if not hasattr(np, "trapz"):  # turboquant 0.2.0 calls np.trapz, removed in numpy 2.4
            np.trapz = np.trapezoid  # type: ignore[attr-defined]
        from turboquant import TurboQuantIP, TurboQuantMSE
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return f"turboquant unavailable: {type(err).__name__}: {err}"
    methods: dict[str, RoundTrip] = {}
    for bits in (1, 2, 3, 4):
        mse = TurboQuantMSE(dim, bits=bits, device=device)
        ip = TurboQuantIP(dim, bits=bits, device=device) if bits >= 2 else None
        # Ideal packed rate: b index bits per element + a float16 norm per vector (+ a float16
        # residual norm for the QJL stage). The package itself stores one byte per index.
        rate = bits + 16 / dim

        def run_mse(x: torch.Tensor, role: str, mse=mse, rate=rate) -> tuple[torch.Tensor, float]:
            idx, norms = mse.quantize(x.float())
            return mse.dequantize(idx, norms).to(x.dtype).reshape(x.shape), rate

        methods[f"turboquant-mse b={bits}"] = run_mse
        if ip is not None:
            def run_prod(x: torch.Tensor, role: str, ip=ip, mse=mse, bits=bits) -> tuple[torch.Tensor, float]:
                if role == "value":
                    return run_mse(x, role, mse, bits + 16 / dim)
                parts = ip.quantize(x.float())
                return ip.dequantize(*parts).to(x.dtype).reshape(x.shape), bits + 32 / dim

            methods[f"turboquant-prod b={bits}"] = run_prod
    return methods


def quanto_roundtrips() -> dict[str, RoundTrip] | str:
    """transformers' QuantizedCache with the quanto backend (residual_length=0), read back
    through its own update(); bytes counted from quanto's packed tensors."""
    try:
        from transformers import LlamaConfig
        from transformers.cache_utils import QuantizedCache
        import optimum.quanto  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"quanto unavailable: {type(err).__name__}: {err}"
    methods: dict[str, RoundTrip] = {}
    for bits in (2, 4):
        for group in (32, 64):
            def run(x: torch.Tensor, role: str, bits=bits, group=group) -> tuple[torch.Tensor, float]:
                batch, heads, tokens, dim = x.shape
                config = LlamaConfig(num_hidden_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                                     num_key_value_heads=heads, head_dim=dim)
                cache = QuantizedCache(backend="quanto", config=config, nbits=bits, q_group_size=group, residual_length=0)
                cache.update(x[:, :, :-1], x[:, :, :-1], 0)
                stored = cache.layers[0]._quantized_keys
                bits_used = 8 * sum(t.numel() * t.element_size() for t in _quanto_tensors(stored)) / x[:, :, :-1].numel()
                decoded, _ = cache.update(x[:, :, -1:], x[:, :, -1:], 0)
                return decoded.to(x.dtype), bits_used

            methods[f"hf-quanto b={bits} g={group}"] = run
    return methods


def _quanto_tensors(qtensor: Any) -> list[torch.Tensor]:
    """Plain tensors inside a quanto quantized tensor (packed data, scale, shift)."""
    found: list[torch.Tensor] = []
    for name in ("_data", "_scale", "_shift"):
        inner = getattr(qtensor, name, None)
        if inner is None:
            continue
        if type(inner) is torch.Tensor or isinstance(inner, torch.nn.Parameter):
            found.append(inner)
        else:
            found.extend(_quanto_tensors(inner))
    return found


# -- real K/V -------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerKV:
    query: torch.Tensor  # [W, Hq, T, D]
    key: torch.Tensor  # [W, Hkv, T, D]
    value: torch.Tensor
    scaling: float


@torch.no_grad()
def capture_kv(windows: int, length: int, device: str) -> list[LayerKV]:
    """Queries, keys and values of every layer of kvpatch-ref over `windows` stretches of
    held-out text, captured inside kvpatch's attention function (so after RoPE)."""
    model, tokenizer = kvpatch.models.load("kvpatch-ref")
    model = model.float().to(device)
    ids = kvpatch.data.needle.encode(tokenizer, kvpatch.models.reference.heldout_text())
    if len(ids) < windows * length:
        raise SystemExit(f"held-out text has {len(ids)} tokens; need {windows * length}")
    batch = torch.tensor([ids[i * length : (i + 1) * length] for i in range(windows)], device=device)
    captured: dict[int, LayerKV] = {}

    def keep(module: torch.nn.Module, query, key, value, scaling) -> None:
        captured[module.layer_idx] = LayerKV(query.float(), key.float(), value.float(), float(scaling))

    kvpatch.apply(model, "default")
    with observe_attention(keep):
        model(input_ids=batch, use_cache=True)
    kvpatch.unpatch(model)
    return [captured[i] for i in sorted(captured)]


def attention_output(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, n_queries: int) -> torch.Tensor:
    """Causal attention output of the last `n_queries` positions: [W, Hq, n_queries, D]."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    q = query[:, :, -n_queries:]
    scores = (q @ k.transpose(-1, -2)) * scaling
    t = key.shape[2]
    visible = torch.ones(n_queries, t, dtype=torch.bool, device=q.device).tril(t - n_queries)
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ v


def codec_row(name: str, family: str, roundtrip: RoundTrip, layers: list[LayerKV], n_queries: int) -> dict[str, Any]:
    k_err, v_err, bits, cosines = [], [], [], []
    for layer in layers:
        k_hat, k_bits = roundtrip(layer.key, "key")
        v_hat, v_bits = roundtrip(layer.value, "value")
        k_err.append(((k_hat - layer.key).norm() / layer.key.norm()).item())
        v_err.append(((v_hat - layer.value).norm() / layer.value.norm()).item())
        bits += [k_bits, v_bits]
        ref = attention_output(layer.query, layer.key, layer.value, layer.scaling, n_queries)
        got = attention_output(layer.query, k_hat.float(), v_hat.float(), layer.scaling, n_queries)
        cosines.append(torch.nn.functional.cosine_similarity(got, ref, dim=-1).flatten().double().cpu())
    cos = torch.cat(cosines)
    rate = statistics.fmean(bits)
    return {
        "method": name,
        "family": family,
        "bits_per_element": rate,
        "ratio_vs_fp16": 16.0 / rate,
        "key_rel_error": statistics.fmean(k_err),
        "value_rel_error": statistics.fmean(v_err),
        "attn_cosine_mean": cos.mean().item(),
        "attn_cosine_p05": cos.quantile(0.05).item(),
        "attn_cosine_per_layer": [c.mean().item() for c in cosines],
    }


def run_codec(args: argparse.Namespace) -> dict[str, Any]:
    layers = capture_kv(args.windows, args.length, args.device)
    dim = layers[0].key.shape[-1]
    methods: list[tuple[str, str, RoundTrip]] = [
        (f"{label} " + " ".join(f"{k}={v}" for k, v in params.items()), label, kvpatch_roundtrip(impl, params))
        for label, impl, params in KVPATCH_SETTINGS
    ]
    unavailable: dict[str, str] = {}
    for family, found in (("turboquant", turboquant_roundtrips(dim, args.device)), ("hf-quanto", quanto_roundtrips())):
        if isinstance(found, str):
            unavailable[family] = found
        else:
            methods += [(name, family, fn) for name, fn in found.items()]
    rows = []
    for name, family, fn in tqdm(methods, desc="codec"):
        try:
            rows.append(codec_row(name, family, fn, layers, args.queries))
        except Exception as err:  # noqa: BLE001 - a failing baseline is reported, not fatal
            unavailable[name] = f"{type(err).__name__}: {err}"
    return {"windows": args.windows, "length": args.length, "queries": args.queries, "head_dim": dim,
            "rows": rows, "unavailable": unavailable}


# -- speed ----------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of `fn` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compiled_decode(quantizer: QuantizerStage, role: str, block: int, dim: int, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    def decode(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return quantizer.decode(Codes(tensors, block, dim), role, dtype)

    # Every setting compiles the same code objects: without a reset, dynamo's recompile limit
    # is reached after a few settings and the rest silently run eager.
    torch._dynamo.reset()
    return torch.compile(decode, dynamic=False)


def run_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    batch, heads, tokens, dim = args.shape
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, heads, tokens, dim, generator=gen).to(args.device, dtype)
    rows = []
    for label, impl, params in tqdm(KVPATCH_SETTINGS, desc="throughput"):
        quantizer = kvpatch_quantizer(impl, params)
        for role in ("key", "value"):
            codes = quantizer.encode(x, role)
            row = {"method": f"{label} " + " ".join(f"{k}={v}" for k, v in params.items()), "role": role,
                   "shape": list(x.shape), "dtype": str(dtype)}
            n = batch * heads * tokens
            row["encode_tokens_per_s"] = n / _timed(lambda: quantizer.encode(x, role), args.device, args.repeats)
            row["decode_tokens_per_s"] = n / _timed(lambda: quantizer.decode(codes, role, dtype), args.device, args.repeats)
            if args.compile:
                compiled = _compiled_decode(quantizer, role, codes.block_tokens, dim, dtype)
                row["decode_compiled_tokens_per_s"] = n / _timed(lambda: compiled(codes.tensors), args.device, args.repeats)
            rows.append(row)
    return rows


@torch.no_grad()
def run_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Encode cost of one decode step (every layer's new K/V) against a dense decode step of a
    1B-shaped Llama, both measured here. KIVI encodes a block of `group_size` tokens every
    `group_size` steps, so its per-step cost is the block's time divided by the group size."""
    from kvpatch.compat import cache_kwarg, output_cache
    from kvpatch.testing import bench_model

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = bench_model("llama-1b", dtype=dtype, device=args.device)
    text = model.config.get_text_config(decoder=True)
    layers, kv_heads = text.num_hidden_layers, text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    prompt = torch.randint(0, text.vocab_size, (1, args.overhead_context), device=args.device)
    out = model(input_ids=prompt, use_cache=True)
    cache = output_cache(out)
    token = prompt[:, -1:]
    step = _timed(lambda: model(input_ids=token, use_cache=True, **{cache_kwarg(model): cache}), args.device, args.repeats)
    rows = []
    for label, impl, params in KVPATCH_SETTINGS:
        quantizer = kvpatch_quantizer(impl, params)
        block = max(quantizer.block_tokens("key"), quantizer.block_tokens("value"))
        new = torch.randn(1, kv_heads, block, dim, device=args.device, dtype=dtype)

        def encode_step(encode: Callable[[torch.Tensor, str], Any]) -> Callable[[], None]:
            def run() -> None:
                for _ in range(layers):
                    encode(new, "key")
                    encode(new, "value")
            return run

        torch._dynamo.reset()
        compiled = {role: torch.compile(lambda x, role=role: quantizer.encode(x, role).tensors, dynamic=False)
                    for role in ("key", "value")}
        per_step = _timed(encode_step(quantizer.encode), args.device, args.repeats) / block
        per_step_compiled = _timed(encode_step(lambda x, role: compiled[role](x)), args.device, args.repeats) / block
        rows.append({"method": f"{label} " + " ".join(f"{k}={v}" for k, v in params.items()),
                     "encode_ms_per_step": per_step * 1e3, "fraction_of_decode_step": per_step / step,
                     "compiled_encode_ms_per_step": per_step_compiled * 1e3,
                     "compiled_fraction_of_decode_step": per_step_compiled / step})
    return {"model": "llama-1b", "context": args.overhead_context,
            "decode_step_ms": step * 1e3, "rows": rows}


# -- end to end -----------------------------------------------------------------------------------


def deployable_config(name: str, impl: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "fidelity": {"lossless": False},
        "stages": [
            {"kind": "quantizer", "impl": impl, "params": params},
            {"kind": "storage", "impl": "quantized", "params": {"residual_length": 128, "sink_tokens": 4}},
        ],
    }


E2E_CONFIGS: list[str | dict[str, Any]] = [
    "kivi4",
    "kivi2",
    deployable_config("kivi2-g64", "kivi", {"bits": 2, "group_size": 64}),
    "fibquant",
    deployable_config("fibquant-k4b12", "fibquant", {"block_dim": 4, "code_bits": 12}),
    deployable_config("fibquant-k8b12", "fibquant", {"block_dim": 8, "code_bits": 12}),
    deployable_config("fibquant-k16b8", "fibquant", {"block_dim": 16, "code_bits": 8}),
    deployable_config("fibquant-k16b4", "fibquant", {"block_dim": 16, "code_bits": 4}),
]


def run_e2e(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kvpatch.eval import EvalSettings, evaluate, reference_run

    model, tokenizer = kvpatch.models.load("kvpatch-ref")
    model = model.to(args.device)
    settings = dataclasses.replace(
        EvalSettings.full(), ppl_max_tokens=args.ppl_tokens, needle_lengths=(1024, 2048), needle_per_cell=args.needle_per_cell,
    )
    results = []
    reference = reference_run(model, tokenizer, settings)
    for config in tqdm(E2E_CONFIGS, desc="e2e"):
        if isinstance(config, str) and config not in kvpatch.config.bundled_configs():
            continue
        result = evaluate(model, tokenizer, config, reference=reference)
        results.append(result.to_dict())
    return results


# -- output ---------------------------------------------------------------------------------------


def plot(codec: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families = sorted({r["family"] for r in codec["rows"]})
    for family in families:
        rows = sorted((r for r in codec["rows"] if r["family"] == family), key=lambda r: r["ratio_vs_fp16"])
        ax.plot([r["ratio_vs_fp16"] for r in rows], [r["attn_cosine_mean"] for r in rows], marker="o", label=family)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio vs fp16 (all scales, norms, indices counted)")
    ax.set_ylabel("attention-output cosine (mean)")
    ax.set_title(f"kvpatch-ref real K/V, {codec['windows']}x{codec['length']} tokens, whole windows encoded")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["codec", "throughput", "overhead"],
                        choices=["codec", "throughput", "overhead", "e2e"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 8, 4096, 128], metavar=("B", "H", "T", "D"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd decode")
    parser.add_argument("--overhead-context", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--needle-per-cell", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "platform": platform.platform()}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for part in args.parts:
        start = time.perf_counter()
        report[part] = {"codec": run_codec, "throughput": run_throughput, "overhead": run_overhead, "e2e": run_e2e}[part](args)
        report[f"{part}_wall_s"] = time.perf_counter() - start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))  # partial results survive a later failure
    if args.plot is not None and "codec" in report:
        plot(report["codec"], args.plot)
    if "codec" in report:
        print(f"{'method':34s} {'bits':>6s} {'ratio':>6s} {'K err':>6s} {'V err':>6s} {'attn cos':>8s} {'p05':>6s}")
        for r in sorted(report["codec"]["rows"], key=lambda r: -r["bits_per_element"]):
            print(f"{r['method']:34s} {r['bits_per_element']:6.3f} {r['ratio_vs_fp16']:6.2f} {r['key_rel_error']:6.3f} "
                  f"{r['value_rel_error']:6.3f} {r['attn_cosine_mean']:8.4f} {r['attn_cosine_p05']:6.3f}")
        for name, why in report["codec"]["unavailable"].items():
            print(f"{name}: {why}")


if __name__ == "__main__":
    main()
