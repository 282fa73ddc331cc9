"""Soak test of a `kvpatch.Engine` under small RAM and disk chunk budgets: many requests of a
realistic reuse mix, with resident memory, budgets, hit ratio and latency tracked after every one.

The engine runs the bundled `prefix_reuse` config with its store shrunk to `--ram-budget` bytes
of RAM over a disk tier of `--disk-budget` bytes (in a temporary folder), so the RAM store keeps
evicting and spilling to disk and the disk tier keeps evicting too. Prompts are deterministic
from `--seed`: a pool of `--pool` "system prompts"/documents cut from the shipped held-out text
at different offsets and lengths, drawn with Zipf-like popularity (a few hit often, most rarely),
each followed by a unique question (a second segment); prompts are about 64-600 tokens.

After every request it records time to first token, total latency, the reuse ratio, the process
RSS (/proc/self/statm), the RAM store's bytes (its counter and the tensors it really holds) and the
disk tier's bytes (its counter and the real size of its folder's files); budgets are also checked
after every store write. Checks: RSS growth after warm-up (median of the last 10 requests over
the median of the 10 right after `--warmup`) below `--max-rss-growth`, and no budget exceeded at
any step. Exit code 1 if a check fails. Writes a JSON file (settings, summary, one row per request)
and a plot (RSS, store bytes against budgets, reuse ratio and TTFT over the requests).

    python tools/soak.py --requests 1000 --warmup 100 --ram-budget 4194304 --disk-budget 16777216 \\
        --model kvpatch-ref --out results/soak-cpu.json --plot docs/soak-cpu.png

`run_soak` is the measurement loop (tests/test_soak.py runs a short one on `tiny-llama`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import kvpatch
from kvpatch.models import heldout_text, load_named
from kvpatch.reuse.disk_tier import SUBDIR

MiB = 2**20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Requests whose RSS medians form the baseline (right after warm-up) and the final value.
RSS_SAMPLES = 10


# -- measurements ------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process: resident pages (/proc/self/statm, 2nd field) x page size."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def folder_bytes(directory: Path) -> tuple[int, int, int]:
    """(bytes of every regular file under `directory`, bytes of its chunk files, number of chunk
    files), from a fresh listing: what really sits on disk, whatever the tier's counter says."""
    total = chunks = count = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += info.st_size
            if name.endswith(".safetensors") and not name.startswith("."):
                chunks += info.st_size
                count += 1
    return total, chunks, count


def ram_tensor_bytes(store: Any) -> tuple[int | None, int | None]:
    """(bytes of the storages behind the K/V payload tensors the RAM tier holds, each storage
    once; bytes of the chunks' token ids), counted independently of the store's own counter
    (which counts the payload only); (None, None) if the store does not expose its slots."""
    slots = getattr(store, "_slots", None)
    if slots is None:
        return None, None
    seen: dict[tuple[int, int], int] = {}
    ids = 0
    for entry in list(slots):
        if entry is None:
            continue
        for t in entry.chunk.tensors.values():
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        ids += entry.chunk.token_ids.untyped_storage().nbytes()
    return sum(seen.values()), ids


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- the engine and the prompts ------------------------------------------------------------------------

def soak_config(ram_budget: int, disk_path: str | os.PathLike[str], disk_budget: int) -> dict[str, Any]:
    """The bundled `prefix_reuse` config with its store's RAM budget and a disk tier replaced."""
    cfg = kvpatch.load_config("prefix_reuse").model_dump()
    store = next(s for s in cfg["stages"] if s["kind"] == "store")
    store["params"] = {**store.get("params", {}), "budget_bytes": int(ram_budget),
                       "disk": {"path": str(disk_path), "budget_bytes": int(disk_budget)}}
    cfg["name"] = "prefix_reuse-soak"
    return cfg


def build_engine(model: str, ram_budget: int, disk_budget: int, disk_path: str | os.PathLike[str],
                 device: str | None = None) -> kvpatch.Engine:
    """An Engine on `model` (a shipped name, `tiny-llama` or a model folder) with the soak config."""
    cfg = soak_config(ram_budget, disk_path, disk_budget)
    if model == "tiny-llama":  # random-init, built in code: Engine.from_pretrained knows no such name
        loaded, tokenizer = load_named(model, device=device)
        return kvpatch.Engine.from_pretrained(loaded, config=cfg, tokenizer=tokenizer)
    return kvpatch.Engine.from_pretrained(model, config=cfg, device=device)


class PromptMix:
    """Deterministic prompts: a pool prefix (Zipf-like popularity) + a unique question, as two
    segments. Lengths are targets in tokens, turned into characters at the text's measured rate."""

    def __init__(self, engine: kvpatch.Engine, seed: int, pool: int = 20, zipf: float = 1.0,
                 prefix_tokens: tuple[int, int] = (48, 400), suffix_tokens: tuple[int, int] = (16, 200),
                 max_prompt_tokens: int = 600) -> None:
        self.engine, self.rng = engine, random.Random(seed)
        self.text = heldout_text()
        sample = self.text[: 5000]
        self.tokens_per_char = len(engine.tokenizer(sample, add_special_tokens=False).input_ids) / len(sample)
        self.max_prompt_tokens = max_prompt_tokens
        self.suffix_tokens = suffix_tokens
        self.prefixes = [self._slice(self.rng.randint(*prefix_tokens)) for _ in range(pool)]
        weights = [1.0 / (rank + 1) ** zipf for rank in range(pool)]
        self.rng.shuffle(weights)  # popularity independent of length and offset
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.prefix_lengths = [int(engine.encode(p)[0].shape[1]) for p in self.prefixes]

    def _count(self, text: str) -> int:
        return len(self.engine.tokenizer(text, add_special_tokens=False).input_ids)

    def _slice(self, tokens: int, tag: str = "") -> str:
        """At most (about) `tokens` tokens of the held-out text from a random line start, `tag` first."""
        chars = max(1, round(tokens / self.tokens_per_char))
        start = self.rng.randrange(0, len(self.text) - 2 * chars - 1)
        line = self.text.rfind("\n", 0, start) + 1
        piece = self.text[line: line + chars]
        for _ in range(8):  # the text's density varies (code, prose): shrink to the token target
            n = self._count(tag + piece)
            if n <= tokens or len(piece) < 8:
                break
            piece = piece[: max(1, int(len(piece) * tokens / n * 0.97))]
        return tag + piece

    def prompt(self, index: int) -> tuple[int, list[str]]:
        """(pool index, [prefix, question]) of request `index` (call in order: one RNG stream)."""
        which = self.rng.choices(range(len(self.prefixes)), weights=self.weights)[0]
        question = self._slice(self.rng.randint(*self.suffix_tokens), f"\n\n### Request {index}: explain this\n")
        segments = [self.prefixes[which], question]
        while int(self.engine.encode(segments)[0].shape[1]) > self.max_prompt_tokens and len(question) > 40:
            question = question[: int(len(question) * 0.9)]  # keep the whole prompt within the cap
            segments = [self.prefixes[which], question]
        return which, segments


# -- the loop ----------------------------------------------------------------------------------------

class BudgetWatch:
    """Checks both budgets after every store write (`put`, disk `write`: the stores' byte
    counters, O(1), so that the check costs the timed request nothing) and after every request
    (the counters and the real bytes: tensors held in RAM, files in the disk folder, listed
    afresh); counts each step that exceeds a budget. Also times the store writes of a request."""

    def __init__(self, store: Any, ram_budget: int, disk_budget: int) -> None:
        self.store, self.ram_budget, self.disk_budget = store, ram_budget, disk_budget
        self.disk_dir = Path(store.disk.root) / SUBDIR  # the tier's own folder under the configured path
        self.checks = self.ram_violations = self.disk_violations = 0
        self.max_ram = self.max_disk = 0
        self.first: list[str] = []  # the first few violations, described
        self.put_ms = self.disk_write_ms = 0.0  # this request's time in store.put / disk.write
        self.disk_writes = 0
        put, write = store.put, store.disk.write

        def checked_put(chunk: Any) -> bool:
            start = time.perf_counter()
            result = put(chunk)
            self.put_ms += (time.perf_counter() - start) * 1e3
            self._check_counters("put")
            return result

        def checked_write(chunk: Any) -> None:
            start = time.perf_counter()
            write(chunk)
            self.disk_write_ms += (time.perf_counter() - start) * 1e3
            self.disk_writes += 1
            self._check_counters("disk write")

        store.put, store.disk.write = checked_put, checked_write  # instance attributes: this engine only

    def _check_counters(self, where: str) -> None:
        ram, disk = int(self.store._bytes), int(self.store.disk._bytes)
        self._judge(where, ram, disk, f"RAM counter {ram}", f"disk counter {disk}")

    def _judge(self, where: str, ram: int, disk: int, ram_seen: str, disk_seen: str) -> None:
        """Count one check of both budgets; a violation is noted with what was seen."""
        self.checks += 1
        self.max_ram, self.max_disk = max(self.max_ram, ram), max(self.max_disk, disk)
        if ram > self.ram_budget:
            self.ram_violations += 1
            self._note(f"{where}: {ram_seen} > {self.ram_budget}")
        if disk > self.disk_budget:
            self.disk_violations += 1
            self._note(f"{where}: {disk_seen} > {self.disk_budget}")

    def check(self, where: str) -> dict[str, Any]:
        """The full check (after a request, outside its timing); returns the sizes and resets the
        request's write timers."""
        ram_counter, disk_counter = int(self.store._bytes), int(self.store.disk._bytes)
        ram_real, ram_ids = ram_tensor_bytes(self.store)
        disk_real, disk_chunks, disk_files = folder_bytes(self.disk_dir)
        self._judge(where, max(ram_counter, ram_real or 0), max(disk_counter, disk_real),
                    f"RAM {ram_counter} (counter) / {ram_real} (tensors)",
                    f"disk {disk_counter} (counter) / {disk_real} (files)")
        sizes = {"ram_bytes": ram_counter, "ram_tensor_bytes": ram_real, "ram_token_id_bytes": ram_ids,
                 "disk_bytes": disk_counter, "disk_file_bytes": disk_real, "disk_chunk_file_bytes": disk_chunks,
                 "disk_files": disk_files, "put_ms": self.put_ms, "disk_write_ms": self.disk_write_ms,
                 "disk_writes": self.disk_writes}
        self.put_ms = self.disk_write_ms = 0.0
        self.disk_writes = 0
        return sizes

    def _note(self, text: str) -> None:
        if len(self.first) < 10:
            self.first.append(text)


def window_summary(rows: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """Per `window` requests: chunk hit ratio (lookups that hit, any tier), RAM share of the hits,
    token-weighted reuse ratio, TTFT and latency median/p95, time in store writes."""
    out = []
    for start in range(0, len(rows), window):
        part = rows[start: start + window]
        before = rows[start - 1] if start else {"hits": 0, "misses": 0, "ram_hits": 0}
        hits = part[-1]["hits"] - before["hits"]
        lookups = hits + part[-1]["misses"] - before["misses"]
        ttft = [r["ttft_ms"] for r in part]
        latency = [r["latency_ms"] for r in part]
        prompt_tokens = sum(r["prompt_tokens"] for r in part)
        out.append({
            "requests": [start, start + len(part)],
            "hit_ratio": hits / lookups if lookups else None,
            "ram_hit_share": (part[-1]["ram_hits"] - before["ram_hits"]) / hits if hits else None,
            "kv_reuse_ratio": sum(r["reused_tokens"] for r in part) / prompt_tokens if prompt_tokens else None,
            "requests_with_reuse": sum(r["kv_reuse_ratio"] > 0 for r in part) / len(part),
            "ttft_ms_median": statistics.median(ttft), "ttft_ms_p95": percentile(ttft, 95),
            "latency_ms_median": statistics.median(latency), "latency_ms_p95": percentile(latency, 95),
            "store_put_ms_mean": statistics.fmean(r["put_ms"] for r in part),
            "disk_write_ms_per_write": (sum(r["disk_write_ms"] for r in part) / writes
                                        if (writes := sum(r["disk_writes"] for r in part)) else None),
            "disk_files_at_end": part[-1]["disk_files"],
        })
    return out


def run_soak(model: str = "kvpatch-ref", requests: int = 1000, warmup: int = 100, ram_budget: int = 4 * MiB,
             disk_budget: int = 16 * MiB, max_new_tokens: int = 4, seed: int = 0, pool: int = 20,
             zipf: float = 1.0, max_prompt_tokens: int = 600, window: int = 100, max_rss_growth: float = 0.05,
             device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the soak; returns {"settings", "summary", "per_request"} (see the module docstring).
    `summary["passed"]`: RSS growth below `max_rss_growth` and no budget violation."""
    if requests < warmup + 2 * RSS_SAMPLES:
        raise ValueError(f"requests ({requests}) must be >= warmup ({warmup}) + {2 * RSS_SAMPLES}: the RSS baseline "
                         f"and final values are medians of {RSS_SAMPLES} requests each")
    settings = {k: v for k, v in locals().items() if k != "progress"}
    torch.manual_seed(seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvpatch-soak-") as disk_path:
        engine = build_engine(model, ram_budget, disk_budget, disk_path, device)
        store = engine.reuse.store
        watch = BudgetWatch(store, ram_budget, disk_budget)
        max_pos = getattr(engine.model.config, "max_position_embeddings", None)
        cap = min(max_prompt_tokens, max_pos - max_new_tokens - 1) if max_pos else max_prompt_tokens
        mix = PromptMix(engine, seed, pool, zipf, max_prompt_tokens=cap)
        build_s = time.perf_counter() - started
        rows: list[dict[str, Any]] = []
        bar = tqdm(range(requests), desc=f"soak {model}", disable=not progress, unit="req", mininterval=2.0)
        for i in bar:
            which, prompt = mix.prompt(i)
            t0 = time.perf_counter()
            result = engine.generate(prompt, max_new_tokens=max_new_tokens)
            latency_ms = (time.perf_counter() - t0) * 1e3
            sizes = watch.check("request")
            stats = store.stats()
            row = {
                "request": i, "pool_prefix": which, "prompt_tokens": result.prompt_tokens,
                "reused_tokens": engine.reuse.last.reused_tokens, "kv_reuse_ratio": result.kv_reuse_ratio,
                "ttft_ms": result.ttft_ms, "total_ms": result.total_ms, "latency_ms": latency_ms,
                "written_chunks": engine.reuse.last.written_chunks, "rss_bytes": rss_bytes(), **sizes,
                "ram_chunks": stats["ram"]["chunks"], "hits": stats["hits"], "misses": stats["misses"],
                "ram_hits": stats["hits_by_tier"]["ram"], "disk_hits": stats["hits_by_tier"].get("disk", 0),
                "evictions": stats["evictions"], "spills": stats["spills"], "promotions": stats["promotions"],
                "rejected": stats["rejected"], "disk_evictions": stats["disk"]["evictions"],
                "disk_write_errors": stats["disk"]["write_errors"],
                "refused": stats["corrupt"] + stats["foreign"] + stats["unauthenticated"],
                "ram_violations": watch.ram_violations, "disk_violations": watch.disk_violations,
                # Sizes of the stores' bookkeeping (growth here is a leak the byte budgets do not see).
                "ram_heap_items": len(getattr(store, "_heap", ())),
                "disk_content_index": len(getattr(store.disk, "_by_content", ())),
            }
            rows.append(row)
            if i % 10 == 0:
                bar.set_postfix(rss=f"{row['rss_bytes'] / MiB:.0f}MiB", reuse=f"{row['kv_reuse_ratio']:.2f}", refresh=False)
        bar.close()
        final_stats = store.stats()
    wall_s = time.perf_counter() - started

    baseline = statistics.median(r["rss_bytes"] for r in rows[warmup: warmup + RSS_SAMPLES])
    final = statistics.median(r["rss_bytes"] for r in rows[-RSS_SAMPLES:])
    growth = final / baseline - 1
    disk_drift = sum(r["disk_bytes"] != r["disk_chunk_file_bytes"] for r in rows)
    ram_drift = sum(r["ram_tensor_bytes"] is not None and r["ram_bytes"] != r["ram_tensor_bytes"] for r in rows)
    with_ids = sum(r["ram_token_id_bytes"] is not None and r["ram_bytes"] + r["ram_token_id_bytes"] > ram_budget
                   for r in rows)
    summary = {
        "requests": requests, "warmup": warmup,
        "rss_baseline_bytes": baseline, "rss_final_bytes": final, "rss_growth": growth,
        "rss_max_bytes": max(r["rss_bytes"] for r in rows[warmup:]),
        "budget_violations_ram": watch.ram_violations, "budget_violations_disk": watch.disk_violations,
        "budget_checks": watch.checks, "first_violations": watch.first,
        "max_ram_bytes": watch.max_ram, "max_disk_bytes": watch.max_disk,
        "requests_counter_differs_from_files_disk": disk_drift, "requests_counter_differs_from_tensors_ram": ram_drift,
        # Informational: the RAM budget counts the K/V payload only (StoredChunk.nbytes), not token ids.
        "requests_ram_over_budget_counting_token_ids": with_ids,
        "max_ram_heap_items": max(r["ram_heap_items"] for r in rows),
        "final_disk_content_index": rows[-1]["disk_content_index"], "final_disk_files": rows[-1]["disk_files"],
        "store": {k: final_stats[k] for k in ("hits", "misses", "evictions", "spills", "promotions", "rejected",
                                              "puts", "corrupt", "foreign", "unauthenticated", "hits_by_tier")},
        "disk": final_stats["disk"],
        "hit_ratio": final_stats["hit_rate"],
        "kv_reuse_ratio": sum(r["reused_tokens"] for r in rows) / sum(r["prompt_tokens"] for r in rows),
        "windows": window_summary(rows, window),
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in rows),
        "ttft_ms_p95": percentile([r["ttft_ms"] for r in rows], 95),
        "build_s": build_s, "wall_s": wall_s,
    }
    summary["passed"] = growth < max_rss_growth and watch.ram_violations == 0 and watch.disk_violations == 0
    settings.update({
        "config": soak_config(ram_budget, "<tempdir>", disk_budget), "max_prompt_tokens_used": cap,
        "pool_prefix_tokens": mix.prefix_lengths, "pool_weights": [round(w, 4) for w in mix.weights],
        "model_dtype": str(engine.model.dtype), "device": str(engine.device),
        "kvpatch": getattr(kvpatch, "__version__", None), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    })
    return {"settings": settings, "summary": summary, "per_request": rows}


# -- outputs -----------------------------------------------------------------------------------------

def _windowed_mean(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot(result: dict[str, Any], path: str | os.PathLike[str], width: int = 50) -> None:
    """Three panels over the request index: RSS, store bytes against budgets, reuse and TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s, cfg = result["per_request"], result["summary"], result["settings"]
    x = [r["request"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    ax = axes[0]
    ax.plot(x, [r["rss_bytes"] / MiB for r in rows], lw=1, label="RSS")
    ax.axhline(s["rss_baseline_bytes"] / MiB, color="k", ls="--", lw=1, label="baseline (after warm-up)")
    ax.axhline(s["rss_baseline_bytes"] * (1 + cfg["max_rss_growth"]) / MiB, color="r", ls=":", lw=1,
               label=f"limit (+{cfg['max_rss_growth']:.0%})")
    ax.axvline(cfg["warmup"], color="grey", lw=0.8)
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"soak: {cfg['model']}, {s['requests']} requests, RSS growth {s['rss_growth']:+.2%}, "
                 f"budget violations RAM {s['budget_violations_ram']} / disk {s['budget_violations_disk']}")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    ax.plot(x, [r["ram_bytes"] / MiB for r in rows], lw=1, label="RAM store")
    ax.plot(x, [r["disk_file_bytes"] / MiB for r in rows], lw=1, label="disk tier (files)")
    ax.axhline(cfg["ram_budget"] / MiB, color="C0", ls="--", lw=1, label="RAM budget")
    ax.axhline(cfg["disk_budget"] / MiB, color="C1", ls="--", lw=1, label="disk budget")
    ax.set_ylabel("store bytes (MiB)")
    ax.legend(loc="center right", fontsize=8)
    ax = axes[2]
    ax.plot(x, _windowed_mean([r["kv_reuse_ratio"] for r in rows], width), color="C2",
            label=f"reuse ratio (mean of {width})")
    ax.set_ylabel("KV reuse ratio")
    ax.set_ylim(0, 1)
    ax.set_xlabel("request")
    twin = ax.twinx()
    twin.plot(x, _windowed_mean([r["ttft_ms"] for r in rows], width), color="C3", label=f"TTFT ms (mean of {width})")
    twin.set_ylabel("TTFT (ms)")
    lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100, help="requests before the RSS baseline is taken")
    parser.add_argument("--ram-budget", type=int, default=4 * MiB, help="RAM store budget, bytes")
    parser.add_argument("--disk-budget", type=int, default=16 * MiB, help="disk tier budget, bytes")
    parser.add_argument("--model", default="kvpatch-ref",
                        help='shipped model name, a model folder, or "tiny-llama" (random init, much faster)')
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=20, help="shared prefixes (system prompts, documents)")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent of the pool (weight 1/rank^s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=600)
    parser.add_argument("--window", type=int, default=100, help="requests per summary window")
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--device", default=None, help="default: CPU")
    parser.add_argument("--out", default="results/soak-cpu.json")
    parser.add_argument("--plot", default="docs/soak-cpu.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run_soak(args.model, args.requests, args.warmup, args.ram_budget, args.disk_budget, args.max_new_tokens,
                      args.seed, args.pool, args.zipf, args.max_prompt_tokens, args.window, args.max_rss_growth,
                      args.device, progress=not args.no_progress)
    result["settings"]["command_line"] = " ".join([Path(sys.executable).name, *sys.argv])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_rounded(result), separators=(",", ":")) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    s = result["summary"]
    print(f"RSS {s['rss_baseline_bytes'] / MiB:.1f} -> {s['rss_final_bytes'] / MiB:.1f} MiB ({s['rss_growth']:+.2%}); "
          f"budget violations RAM {s['budget_violations_ram']}, disk {s['budget_violations_disk']} "
          f"({s['budget_checks']} checks); evictions {s['store']['evictions']}, spills {s['store']['spills']}, "
          f"disk evictions {s['disk']['evictions']}; wall {s['wall_s']:.0f} s")
    for w in s["windows"]:
        print(f"  requests {w['requests'][0]:>5}-{w['requests'][1]:<5} hit ratio {w['hit_ratio'] or 0:.3f}  "
              f"reuse {w['kv_reuse_ratio'] or 0:.3f}  ttft median {w['ttft_ms_median']:.1f} ms  p95 {w['ttft_ms_p95']:.1f} ms")
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    print("PASS" if s["passed"] else "FAIL")
    return 0 if s["passed"] else 1


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits (timings and ratios; byte counts are ints): a small file."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
