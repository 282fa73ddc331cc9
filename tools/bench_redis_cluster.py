"""Throughput and hit ratio of 1, 2, 4, ... Engine processes sharing one Redis Cluster chunk tier.

Starts a throwaway 3-master Redis Cluster on loopback (`kvpatch.testing_redis.LocalCluster`),
then, for each process count P, P worker processes each load `kvpatch.Engine` on the shipped
`kvpatch-ref` model (CPU) with `prefix_reuse` plus the cluster tier (`redis: {cluster: true}`),
and serve `--requests` requests each, started together after every worker has loaded and warmed
up. A request is one of `--documents` shared documents (held-out text, whole 128-token chunks)
plus a question and a suffix unique to the request; each worker visits every document in turn
(`--requests` should be a multiple of `--documents`), starting at its own offset, so a document
one worker prefilled is a Redis hit for the others. For comparison the
same workload runs with `--baseline` RAM-only stores (no sharing between processes). Each run
starts on an empty cluster.

    python tools/bench_redis_cluster.py --out results/redis-cluster-cpu.json

Requests/s = all requests of the run / (last worker's end - first worker's start). Hit ratios:
chunk lookups that hit (by tier) and prompt tokens whose K/V were reused, over the timed
requests only.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

QUESTIONS = ["\ndef main():\n", "\nclass Config:\n", "\nimport os\n", "\n# parse the arguments\n"]
CHUNK = 128  # prefix_reuse's chunk size: documents are whole chunks, so they are reusable in any request


def engine_config(url: str | None) -> dict[str, Any]:
    """`prefix_reuse`, with the Redis Cluster tier at `url` (None: RAM only)."""
    import kvpatch

    config = kvpatch.load_config("prefix_reuse").model_dump()
    if url is not None:
        config["stages"][-1]["params"]["redis"] = {"url": url, "namespace": "bench", "cluster": True}
    return config


def worker(spec: dict[str, Any]) -> None:
    """One Engine process: load, warm up, say "ready", wait for "go" on stdin, serve, print JSON."""
    import torch

    import kvpatch

    torch.set_num_threads(spec["threads"])
    engine = kvpatch.Engine.from_pretrained("kvpatch-ref", config=engine_config(spec["url"]))
    ids = engine.tokenizer(kvpatch.models.heldout_text()).input_ids
    span = spec["document_chunks"] * CHUNK
    documents = [engine.tokenizer.decode(ids[i * span:(i + 1) * span]) for i in range(spec["documents"])]
    engine.generate(f"warm-up of worker {spec['worker']}\n" * 20, max_new_tokens=spec["new_tokens"])
    before = engine.reuse.store.stats()
    print("ready", flush=True)
    sys.stdin.readline()
    start, reused, prompt_tokens = time.time(), 0.0, 0
    offset = spec["worker"] * spec["documents"] // spec["processes"]  # each worker starts elsewhere
    for r in range(spec["requests"]):
        document = documents[(offset + r) % len(documents)]
        question = f"{QUESTIONS[r % len(QUESTIONS)]}# request {spec['worker']}-{r}\n"
        result = engine.generate([document, question], max_new_tokens=spec["new_tokens"])
        reused += result.kv_reuse_ratio * result.prompt_tokens
        prompt_tokens += result.prompt_tokens
    end = time.time()
    after = engine.reuse.store.stats()
    tiers = {tier: after["hits_by_tier"][tier] - before["hits_by_tier"][tier] for tier in after["hits_by_tier"]}
    print(json.dumps({"start": start, "end": end, "requests": spec["requests"], "reused_tokens": reused,
                      "prompt_tokens": prompt_tokens, "hits_by_tier": tiers,
                      "misses": after["misses"] - before["misses"], "redis": after.get("redis")}), flush=True)


def run(processes: int, url: str | None, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """P workers started together; their reports summed."""
    base = {"url": url, "processes": processes, "requests": args.requests, "documents": args.documents,
            "document_chunks": args.document_chunks, "new_tokens": args.new_tokens, "threads": args.threads}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(base | {"worker": w})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for w in range(processes)]
    for proc in procs:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise RuntimeError(f"a worker failed before it was ready (exit {proc.wait()}); its stderr is above")
    for proc in procs:
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker exited with {proc.returncode}; its stderr is above")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    requests = sum(r["requests"] for r in reports)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    tiers = {tier: sum(r["hits_by_tier"].get(tier, 0) for r in reports) for tier in reports[0]["hits_by_tier"]}
    misses = sum(r["misses"] for r in reports)
    lookups = sum(tiers.values()) + misses
    return {"processes": processes, "tier": "redis-cluster" if url else "ram-only", "requests": requests,
            "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "chunk_hit_ratio": round(sum(tiers.values()) / lookups, 4) if lookups else None,
            "redis_hit_ratio": round(tiers.get("redis", 0) / lookups, 4) if lookups else None,
            "token_reuse_ratio": round(sum(r["reused_tokens"] for r in reports)
                                       / sum(r["prompt_tokens"] for r in reports), 4),
            "hits_by_tier": tiers, "misses": misses, "workers": reports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=16, help="per worker process")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--document-chunks", type=int, default=4, help="128-token chunks per document")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run RAM-only stores (no sharing) for comparison")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < args.documents:
        parser.error(f"--requests {args.requests} < --documents {args.documents}: a worker would not see every document")
    if args.worker is not None:
        worker(json.loads(args.worker))
        return

    import redis

    from kvpatch.files.atomic import write_text_atomic
    from kvpatch.reuse.sealed import SECRET_ENV
    from kvpatch.testing_redis import LocalCluster

    env = os.environ | {SECRET_ENV: secrets.token_hex(16)}  # one fleet secret for this run's workers
    runs = [(p, tier) for p in args.processes for tier in (["redis-cluster", "ram-only"] if args.baseline
                                                           else ["redis-cluster"])]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        cluster = LocalCluster(Path(directory))
        try:
            cluster.start()
            for processes, tier in tqdm(runs, desc="runs"):
                for port in cluster.ports:
                    redis.Redis(port=port).flushall()
                row = run(processes, cluster.url if tier == "redis-cluster" else None, args, env)
                rows.append(row)
                tqdm.write(f"{tier:<14} P={processes}  {row['requests_per_s']:6.2f} req/s  chunk hits "
                           f"{row['chunk_hit_ratio']:.3f} (redis {row['redis_hit_ratio']:.3f})  "
                           f"reused tokens {row['token_reuse_ratio']:.3f}")
        finally:
            cluster.stop()
    if args.out:
        report = {"args": vars(args) | {"out": str(args.out)}, "cpu_count": os.cpu_count(), "runs": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
