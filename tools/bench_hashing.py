"""Fibonacci vs modulo hashing vs a Python dict for the chunk index, plus batched tensor lookups.

For each key set (sequential ints, multiples of 2^8 / 2^12 / 2^16, random 64-bit, and real chunk
keys: the first 8 bytes of SHA-256 over random token chunks), builds a `HashIndex` with each hash
at the same capacity (load 0.5, no resizes) and reports the collision rate, mean/max probe length,
insert and lookup throughput; the same for a dict (throughput only) and for `TensorIndex` batched
lookups on --device. A last section scales the tensor index batch size on random keys.

    python tools/bench_hashing.py --quick
    python tools/bench_hashing.py --tag cpu                    # results/hashing-cpu.json, docs/hashing.png
    python tools/bench_hashing.py --device cuda --tag h100 --out-dir "$OUT" --plot "$OUT/hashing-h100.png"

`--algorithms` measures the chunk-key algorithms of `hasher/chained` instead (sha256, blake2b,
blake3, xxhash; docs/hashing.md "Chunk-key algorithms"): hashing a 32K-token prompt's 128-token
chunks the way `ChunkHasher` feeds them, store hit and miss latency of the exact lookup, and the
lookup's share of TTFT on the shipped reference model (CPU, `prefix_reuse` with each algorithm):

    python tools/bench_hashing.py --algorithms --threads 2          # results/hashing-cpu-algorithms.json
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from kvpatch.hashing import HashIndex, IndexConfig, TensorIndex, fibonacci_hash, fibonacci_hash_tensor, keys_tensor

CHUNK_TOKENS = 16
VOCAB = 32000


def chunk_keys(n: int, rng: random.Random) -> list[int]:
    """First 8 bytes (big-endian) of SHA-256 over each 16-token chunk of a random token stream."""
    keys = []
    for _ in range(n):
        chunk = array.array("i", (rng.randrange(VOCAB) for _ in range(CHUNK_TOKENS)))
        keys.append(int.from_bytes(hashlib.sha256(chunk.tobytes()).digest()[:8], "big"))
    return keys


def key_sets(n: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    sets = {"sequential": list(range(n))}
    for bits in (8, 12, 16):
        sets[f"stride-2^{bits}"] = [i << bits for i in range(n)]
    sets["random-64bit"] = [rng.getrandbits(64) for _ in range(n)]
    sets["sha256-chunks"] = chunk_keys(n, rng)
    return sets


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_interleaved(passes: dict[str, Callable[[], Any]], repeats: int, budget_s: float, device: str
                     ) -> dict[str, float]:
    """Fastest pass of each lookup function, taking turns so that load from other processes hits
    every implementation alike; a case stops repeating once it has used `budget_s` (slow cases)."""
    best = {name: float("inf") for name in passes}
    spent = dict.fromkeys(passes, 0.0)
    for _ in range(repeats):
        for name, fn in passes.items():
            if spent[name] > budget_s:
                continue
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            elapsed = time.perf_counter() - start
            best[name], spent[name] = min(best[name], elapsed), spent[name] + elapsed
    return best


def build_python_index(keys: list[int], method: str, capacity: int) -> tuple[HashIndex, dict[str, Any]]:
    index = HashIndex(IndexConfig(initial_capacity=capacity, hash=method))
    start = time.perf_counter()
    for value, key in enumerate(keys):
        index.put(key, value)
    insert_s = time.perf_counter() - start
    stats = index.stats()
    assert stats["resizes"] == 0 and all(index.get(k) == v for v, k in enumerate(keys))
    return index, {"collision_rate": stats["collisions"] / len(keys), "mean_probe_length": stats["mean_probe_length"],
                   "max_probe_length": stats["max_probe_length"], "insert_keys_per_s": len(keys) / insert_s}


def build_dict(keys: list[int]) -> tuple[dict[int, int], dict[str, Any]]:
    table: dict[int, int] = {}
    start = time.perf_counter()
    for value, key in enumerate(keys):
        table[key] = value
    return table, {"insert_keys_per_s": len(keys) / (time.perf_counter() - start)}


def build_tensor(keys: torch.Tensor, capacity: int, device: str) -> tuple[TensorIndex, dict[str, Any]]:
    """All keys inserted in one batch (timed once: a second insert would only update)."""
    values = torch.arange(keys.numel(), device=device)
    index = TensorIndex(capacity, device=device)
    _sync(device)
    start = time.perf_counter()
    index.insert_many(keys, values)
    _sync(device)
    insert_s = time.perf_counter() - start
    assert torch.equal(index.lookup_many(keys), values), "tensor index lost or mixed up keys"
    return index, {"max_probe_length": index.max_probe_length, "insert_keys_per_s": keys.numel() / insert_s}


def scalar_pass(get: Callable[[int], Any], order: list[int]) -> Callable[[], Any]:
    return lambda: [get(key) for key in order]


def bench_keyset(keys: list[int], capacity: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Build every implementation over `keys`, then time lookups of all keys in one shuffled order
    (one key at a time for the Python ones, one batch for the tensor index)."""
    order = random.Random(args.seed + 1).sample(keys, len(keys))
    rows: dict[str, dict[str, Any]] = {}
    passes: dict[str, Callable[[], Any]] = {}
    for method in ("fibonacci", "modulo"):
        index, rows[method] = build_python_index(keys, method, capacity)
        passes[method] = scalar_pass(index.get, order)
    table, rows["dict"] = build_dict(keys)
    passes["dict"] = scalar_pass(table.get, order)
    tensor_index, rows["tensor"] = build_tensor(keys_tensor(keys, args.device), capacity, args.device)
    batch = keys_tensor(order, args.device)
    passes["tensor"] = lambda: tensor_index.lookup_many(batch)
    for name, seconds in best_interleaved(passes, args.repeats, args.budget, args.device).items():
        rows[name]["lookup_keys_per_s"] = len(order) / seconds
    return rows


def seed_spread(n: int, capacity: int, seeds: range) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Probe statistics of both hashes on fresh random and SHA-256 key sets per seed: the tail
    (max probe length) of one table varies a lot from seed to seed."""
    spread: dict[str, dict[str, list[dict[str, float]]]] = {}
    for seed in tqdm(seeds, desc="seed spread", file=sys.stderr):
        rng = random.Random(seed)
        sets = {"random-64bit": [rng.getrandbits(64) for _ in range(n)], "sha256-chunks": chunk_keys(n, rng)}
        for name, keys in sets.items():
            for method in ("fibonacci", "modulo"):
                _, row = build_python_index(keys, method, capacity)
                spread.setdefault(name, {}).setdefault(method, []).append(
                    {key: row[key] for key in ("collision_rate", "mean_probe_length", "max_probe_length")})
    return spread


def hash_agrees(device: str) -> bool:
    """Tensor hash on `device` == Python hash, for keys spanning the whole int64 range."""
    rng = random.Random(0)
    keys = [rng.getrandbits(64) for _ in range(4096)] + [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    got = fibonacci_hash_tensor(keys_tensor(keys, device), 1 << 20).tolist()
    return got == [fibonacci_hash(k, 1 << 20) for k in keys]


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.n or (4096 if args.quick else 16384)
    capacity = 1 << (2 * n - 1).bit_length()
    if not hash_agrees(args.device):
        raise SystemExit(f"tensor Fibonacci hash on {args.device} disagrees with the Python hash")
    sets = key_sets(n, args.seed)
    results = {name: bench_keyset(keys, capacity, args) for name, keys in tqdm(sets.items(), desc="key sets",
                                                                                file=sys.stderr)}

    spread = seed_spread(n, capacity, range(args.seed + 100, args.seed + 100 + (3 if args.quick else 8)))

    scaling = []
    sizes = [1 << b for b in range(12, 17 if args.quick else 21, 2)]
    for size in tqdm(sizes, desc="tensor scaling", file=sys.stderr):
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        keys = torch.randint(-(2**63) + 1, 2**63 - 1, (size,), device=args.device, generator=gen).unique()
        keys = keys[torch.randperm(keys.numel(), device=args.device, generator=gen)]
        size = keys.numel()
        table = 1 << (2 * size - 1).bit_length()
        index, row = build_tensor(keys, table, args.device)
        seconds = best_interleaved({"tensor": lambda: index.lookup_many(keys)}, args.repeats, args.budget, args.device)
        scaling.append({"n": size, "capacity": table, **row, "lookup_keys_per_s": size / seconds["tensor"]})

    return {
        "tag": args.tag, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "quick": args.quick, "n_keys": n, "capacity": capacity, "load_factor": n / capacity,
        "repeats": args.repeats, "chunk_tokens": CHUNK_TOKENS, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0],
        "python": platform.python_version(), "torch": torch.__version__,
        "hash_agrees": True, "keysets": results, "seed_spread": spread, "tensor_scaling": scaling,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}", file=sys.stderr)
        return
    names = list(result["keysets"])
    rows = result["keysets"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    width = 0.2
    colors = {"fibonacci": "tab:blue", "modulo": "tab:orange", "dict": "tab:green", "tensor": "tab:red"}
    panels = [
        ("mean probe length (slots examined per hit)", "mean_probe_length", ("fibonacci", "modulo")),
        ("max probe length", "max_probe_length", ("fibonacci", "modulo", "tensor")),
        ("lookup throughput (keys/s)", "lookup_keys_per_s", ("fibonacci", "modulo", "dict", "tensor")),
    ]
    for ax, (title, metric, impls) in zip(axes, panels):
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [rows[name][impl][metric] for name in names], width, label=impl, color=colors[impl])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="upper right", ncol=4, fontsize=9)
    fig.suptitle(f"Chunk index hashing, {result['n_keys']} keys at load {result['load_factor']:.2f} "
                 f"({result['tag']}, tensor on {result['device']})", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# -- chunk-key algorithms (--algorithms) -------------------------------------------------------------

ALGORITHMS = ("sha256", "blake2b", "blake3", "xxhash")
KEY_CHUNK = 128  # prefix_reuse's chunk size


def _best_ns(passes: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Fastest of `repeats` passes per function, in nanoseconds, the functions taking turns."""
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):
        for name, fn in passes.items():
            start = time.perf_counter_ns()
            fn()
            best[name] = min(best[name], time.perf_counter_ns() - start)
    return best


def _bound_chunk(hasher: Any, ids: torch.Tensor, span: tuple[int, int], parent: str, prefix: str, content: str,
                 kv_shape: tuple[int, int, int], dtype: torch.dtype) -> Any:
    from kvpatch.reuse.chunk import StoredChunk

    layers, heads, dim = kv_shape
    kv = torch.randn(layers, 2, heads, span[1] - span[0], dim).to(dtype)
    return StoredChunk(prefix, content, ids[span[0]:span[1]].clone(), span[0], {"kv": kv},
                       namespace=hasher.namespace, parent_hash=parent)


def _fill(store: Any, hasher: Any, ids: torch.Tensor, spans: list, kv_shape: tuple[int, int, int],
          dtype: torch.dtype) -> None:
    """Put every chunk of `ids` into `store`, bound to `hasher` (as write-back would)."""
    from kvpatch.reuse.chunk_hash import token_bytes

    prefixes, contents = hasher.hashes(token_bytes(ids), spans)
    parent = hasher.namespace
    for span, prefix, content in zip(spans, prefixes, contents):
        assert store.put(_bound_chunk(hasher, ids, span, parent, prefix, content, kv_shape, dtype))
        parent = prefix


def bench_key_hashing(n_tokens: int, repeats: int) -> dict[str, Any]:
    """Per algorithm: one chunk's prefix key (the bytes `prefix_hash` hashes), the exact lookup's
    keys of a whole prompt (`hashes(content=False)`) and the approximate lookup's (both keys)."""
    from kvpatch.reuse.chunk_hash import ChunkHasher, token_bytes

    ids = torch.randint(0, VOCAB, (n_tokens,), generator=torch.Generator().manual_seed(0))
    spans = [(s, min(s + KEY_CHUNK, n_tokens)) for s in range(0, n_tokens, KEY_CHUNK)]
    data = token_bytes(ids)
    hashers = {a: ChunkHasher("bench-namespace", a) for a in ALGORITHMS}
    chunks = [data[8 * a : 8 * b] for a, b in spans]

    def per_chunk(h: Any) -> Callable[[], Any]:
        parent = h.namespace
        return lambda: [h.prefix_hash(parent, c) for c in chunks]

    chunk_ns = _best_ns({a: per_chunk(h) for a, h in hashers.items()}, repeats)
    exact_ns = _best_ns({a: (lambda h=h: h.hashes(data, spans, content=False)) for a, h in hashers.items()}, repeats)
    both_ns = _best_ns({a: (lambda h=h: h.hashes(data, spans)) for a, h in hashers.items()}, repeats)
    bytes_ns = _best_ns({"token_bytes": lambda: token_bytes(ids)}, repeats)["token_bytes"]
    message = len(b"prefix\0") + len(hashers["sha256"].namespace) + 1 + 8 * KEY_CHUNK
    # Raw digests by message size: BLAKE3 hashes 1 KiB blocks in parallel (SIMD) only within one
    # long message; a chunk key is one ~1 KiB message, where SHA-256 with SHA-NI is as fast or faster.
    sizes = {}
    for size in (1024, 16384, 262144):
        blob = os.urandom(size)
        n = max(1, 2**20 // size)
        best = _best_ns({a: (lambda d=h._digest: [d(blob) for _ in range(n)]) for a, h in hashers.items()}, repeats // 5 or 1)
        sizes[str(size)] = {a: ns / n for a, ns in best.items()}
    return {
        "prompt_tokens": n_tokens, "chunk_tokens": KEY_CHUNK, "chunks": len(spans),
        "prefix_message_bytes_sha256": message, "token_bytes_us_per_prompt": bytes_ns / 1e3,
        "raw_digest_ns_by_message_bytes": sizes,
        "per_algorithm": {a: {"ns_per_chunk": chunk_ns[a] / len(spans),
                              "exact_keys_us_per_prompt": exact_ns[a] / 1e3,
                              "exact_and_content_keys_us_per_prompt": both_ns[a] / 1e3,
                              "key_example": hashers[a].prefix_hash(hashers[a].namespace, chunks[0])}
                          for a in ALGORITHMS},
    }


def bench_store_lookup(n_tokens: int, repeats: int) -> dict[str, Any]:
    """Per algorithm: `match_chunks` (the exact lookup after hashing) over a prompt whose chunks are
    all in a RAM store (hits) and over a fresh prompt (misses), keys precomputed."""
    from kvpatch.reuse.chunk_hash import ChunkHasher, token_bytes
    from kvpatch.reuse.matcher import match_chunks
    from kvpatch.reuse.memory_store import TieredChunkStore

    gen = torch.Generator().manual_seed(1)
    stored, fresh = (torch.randint(0, VOCAB, (n_tokens,), generator=gen) for _ in range(2))
    spans = [(s, min(s + KEY_CHUNK, n_tokens)) for s in range(0, n_tokens, KEY_CHUNK)]
    passes, stores = {}, {}
    for a in ALGORITHMS:
        hasher = ChunkHasher("bench-namespace", a)
        store = TieredChunkStore(2**30, pin_memory=False)
        store.bind(hasher, None)
        _fill(store, hasher, stored, spans, (1, 1, 8), torch.float32)
        hit_keys = hasher.hashes(token_bytes(stored), spans)
        miss_keys = hasher.hashes(token_bytes(fresh), spans)
        passes[f"{a}/hit"] = lambda s=store, k=hit_keys: match_chunks(spans, k[0], k[1], s, approximate=False)
        passes[f"{a}/miss"] = lambda s=store, k=miss_keys: match_chunks(spans, k[0], k[1], s, approximate=False)
        stores[a] = store
    best = _best_ns(passes, repeats)
    for a, store in stores.items():
        plan = passes[f"{a}/hit"]()
        assert all(m.kind == "exact" for m in plan.matches), f"{a}: a stored chunk was missed"
        assert all(m.kind == "miss" for m in passes[f"{a}/miss"]().matches), f"{a}: a fresh chunk hit"
    return {a: {f"{kind}_us_per_prompt": best[f"{a}/{kind}"] / 1e3 for kind in ("hit", "miss")}
            | {f"{kind}_ns_per_chunk": best[f"{a}/{kind}"] / len(spans) for kind in ("hit", "miss")}
            for a in ALGORITHMS}


def _reuse_config(algorithm: str) -> dict[str, Any]:
    from kvpatch.config import load_config

    data = load_config("prefix_reuse").model_dump(mode="json")
    for stage in data["stages"]:
        if stage["kind"] == "hasher":
            stage["params"] = {"algorithm": algorithm}
    data["name"] = f"prefix_reuse-{algorithm}"
    return data


def bench_ttft_share(load_model: Callable[[], torch.nn.Module], lengths: list[int], synthetic: list[int],
                     repeats: int) -> list[dict]:
    """TTFT of `prefix_reuse` per algorithm (CPU): one model copy patched per algorithm, the
    algorithms taking turns. Per length, a cold request (fresh random prompt; it writes its chunks
    back) then the same prompt again (every chunk reused, the last token computed); a first round
    warms up and is not counted. For `synthetic` lengths the chunks are put directly (a cold
    patched prefill per algorithm would take minutes) and the cold case is one unpatched prefill."""
    import kvpatch
    from kvpatch.model_shapes import ModelShapes
    from kvpatch.reuse.chunker import chunk_spans

    models = {a: load_model() for a in ALGORITHMS}
    reference = models["sha256"]
    shapes = ModelShapes.of(reference.config)
    kv = (shapes.num_layers, shapes.kv_heads, shapes.head_dim)
    gen = torch.Generator().manual_seed(2)
    rows = []

    def forward(model: torch.nn.Module, ids: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
        return (time.perf_counter() - start) * 1e3

    def request(handle: Any, model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float, float, int]:
        handle.reuse.set_host_ids(ids)  # as the Engine does: hash the host copy
        ms = forward(model, ids)
        last = handle.reuse.last
        return ms, last.lookup_ms, last.load_ms, last.reused_tokens

    for length in [*lengths, *[n for n in synthetic if n not in lengths]]:
        direct = length not in lengths
        row: dict[str, Any] = {"length": length, "warm": "chunks put directly" if direct else "cold request",
                               "unpatched_prefill_ms": None, "per_algorithm": {}}
        if direct:
            row["unpatched_prefill_ms"] = forward(reference, torch.randint(0, shapes.vocab_size, (1, length), generator=gen))
        samples = {a: {f"{case}{part}": [] for case in ("cold", "reused") for part in ("", "_lookup", "_load")}
                   for a in ALGORITHMS}
        handles = {a: kvpatch.apply(m, _reuse_config(a)) for a, m in models.items()}
        try:
            for rep in range(repeats + 1):  # round 0 warms up
                for a, handle in handles.items():
                    ids = torch.randint(0, shapes.vocab_size, (1, length), generator=gen)
                    if direct:
                        c = handle.reuse.chunker
                        spans = chunk_spans(ids[0].numpy(), c.params.size, c.params.boundary_window, c.boundary_tokens, [])
                        _fill(handle.reuse.store, handle.reuse.hasher, ids[0], spans, kv, reference.dtype)
                    else:
                        cold = request(handle, models[a], ids)
                    reused = request(handle, models[a], ids)
                    assert reused[3] == length - 1, (a, length, reused[3])
                    for case, got in (("cold", None if direct else cold), ("reused", reused)):
                        if rep and got is not None:
                            for part, value in zip(("", "_lookup", "_load"), got):
                                samples[a][f"{case}{part}"].append(value)
        finally:
            for m in models.values():
                kvpatch.unpatch(m)
        for a, got in samples.items():
            out: dict[str, Any] = {}
            for case in ("cold", "reused"):
                if got[case]:
                    ttft, lookup = statistics.median(got[case]), statistics.median(got[f"{case}_lookup"])
                    out[case] = {"ttft_ms": ttft, "lookup_ms": lookup, "lookup_share": lookup / ttft,
                                 "load_ms": statistics.median(got[f"{case}_load"])}
            row["per_algorithm"][a] = out
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def run_algorithms(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    import kvpatch

    start = time.perf_counter()
    hashing = bench_key_hashing(args.prompt_tokens, max(args.repeats, 50))
    store = bench_store_lookup(args.prompt_tokens, max(args.repeats, 30))
    ttft = bench_ttft_share(lambda: kvpatch.models.load("kvpatch-ref", dtype=torch.float32)[0],
                            args.ttft_lengths, args.synthetic_lengths, args.ttft_repeats)
    versions = {}
    for name in ("blake3", "xxhash"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "command": "python " + " ".join(sys.argv), "device_name": cpu_name(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "load_average_1min_at_end": os.getloadavg()[0],
        "python": platform.python_version(), "torch": torch.__version__, "packages": versions,
        "model": "kvpatch-ref (float32, CPU; max_position_embeddings 2048: longer prompts are timing only)",
        "wall_s": time.perf_counter() - start,
        "hashing": hashing, "store_lookup": store, "ttft": ttft,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device of the tensor index (cpu, cuda)")
    parser.add_argument("--tag", default=None, help="result name: <out-dir>/hashing-<tag>.json (default: device)")
    parser.add_argument("--out-dir", type=Path, default=Path("results"))
    parser.add_argument("--plot", type=Path, default=Path("docs/hashing.png"))
    parser.add_argument("--quick", action="store_true", help="4096 keys, smaller tensor sweep (< 60 s)")
    parser.add_argument("--n", type=int, default=None, help="keys per key set (default 16384, quick 4096)")
    parser.add_argument("--repeats", type=int, default=20, help="timed lookup passes; the fastest counts")
    parser.add_argument("--budget", type=float, default=3.0, help="stop repeating a case after this many seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 on a shared machine, where "
                             "OpenMP threads waiting on each other slow small tensor ops a hundredfold)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", action="store_true",
                        help="benchmark the chunk-key algorithms instead (hashing, store hit/miss, TTFT share)")
    parser.add_argument("--prompt-tokens", type=int, default=32768, help="--algorithms: prompt length hashed")
    parser.add_argument("--ttft-lengths", type=int, nargs="*", default=[2048, 8192],
                        help="--algorithms: prompt lengths timed end to end (a cold and a fully reused request each)")
    parser.add_argument("--synthetic-lengths", type=int, nargs="*", default=[32768],
                        help="--algorithms: lengths whose reused request is timed over stored chunks put directly "
                             "(no cold prefill per algorithm); one unpatched prefill is timed for the cold case")
    parser.add_argument("--ttft-repeats", type=int, default=3, help="--algorithms: requests per point (median)")
    args = parser.parse_args()
    args.tag = args.tag or args.device.split(":")[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.algorithms:
        out = args.out_dir / f"hashing-{args.tag}-algorithms.json"
        result = run_algorithms(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"hashing-{args.tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot)
    print(f"wrote {out} and {args.plot}")
    for name, row in result["keysets"].items():
        fib, mod = row["fibonacci"], row["modulo"]
        print(f"{name:>14}: probes fib {fib['mean_probe_length']:.2f}/{fib['max_probe_length']} "
              f"mod {mod['mean_probe_length']:.2f}/{mod['max_probe_length']}  "
              f"lookups/s fib {fib['lookup_keys_per_s']:.3g} "
              f"mod {mod['lookup_keys_per_s']:.3g} dict {row['dict']['lookup_keys_per_s']:.3g} "
              f"tensor {row['tensor']['lookup_keys_per_s']:.3g}")
    for name, methods in result["seed_spread"].items():
        print(f"{name:>14}: max probe length over seeds " + ", ".join(
            f"{method} {min(r['max_probe_length'] for r in rows)}-{max(r['max_probe_length'] for r in rows)}"
            for method, rows in methods.items()))


if __name__ == "__main__":
    main()
