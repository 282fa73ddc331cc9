"""A short soak (tools/soak.py) on the random tiny Llama: budgets that bind, and hold at every step.

The full soak (1,000 requests on kvpatch-ref, results/soak-cpu.json) is run by hand:
`python tools/soak.py`. This one keeps the same loop and checks to bounded CI time (seconds).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SOAK_PATH = Path(__file__).resolve().parents[1] / "tools" / "soak.py"

#: tiny-llama chunks are 64 KiB (128 tokens x 2 layers x K,V x 2 heads x 16 dims x fp32): the RAM
#: tier holds 8 of them and the disk tier 32, against ~25 MiB of chunks written over the run.
RAM_BUDGET = 8 * 64 * 1024
DISK_BUDGET = 32 * 64 * 1024
REQUESTS, WARMUP, WINDOW = 150, 50, 50

#: The full soak's bound. On this 2-layer random model the store holds < 3 MiB against an RSS of
#: ~450 MiB (torch, transformers), so this short run catches only leaks of more than ~0.25 MiB per request;
#: allocator noise measured under 0.5% (three seeds), well inside it.
MAX_RSS_GROWTH = 0.05


def _load_soak():
    spec = importlib.util.spec_from_file_location("kvpatch_tools_soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def test_short_soak_holds_budgets_memory_and_reuse(tmp_path: Path) -> None:
    soak = _load_soak()
    result = soak.run_soak("tiny-llama", requests=REQUESTS, warmup=WARMUP, ram_budget=RAM_BUDGET,
                           disk_budget=DISK_BUDGET, max_new_tokens=2, seed=0, window=WINDOW,
                           max_rss_growth=MAX_RSS_GROWTH, progress=False)
    s, rows = result["summary"], result["per_request"]
    assert [r["request"] for r in rows] == list(range(REQUESTS))

    # The budgets bind: RAM evicted and spilled to disk, the disk tier evicted too, and chunks
    # came back from disk (promotions); both tiers ran close to full.
    assert s["store"]["evictions"] > 0 and s["store"]["spills"] > 0, s["store"]
    assert s["disk"]["evictions"] > 0, s["disk"]
    assert s["store"]["hits_by_tier"]["disk"] > 0 and s["store"]["promotions"] > 0, s["store"]
    assert s["max_ram_bytes"] > RAM_BUDGET // 2 and s["max_disk_bytes"] > DISK_BUDGET // 2
    assert s["disk"]["write_errors"] == 0 and s["store"]["corrupt"] == s["store"]["foreign"] == 0

    # ... and hold at every step (after every store write and every request), by the stores'
    # counters and by what really is held (tensors in RAM, files on disk).
    assert s["budget_checks"] > REQUESTS
    assert s["budget_violations_ram"] == 0 and s["budget_violations_disk"] == 0, s["first_violations"]
    assert max(r["ram_bytes"] for r in rows) <= RAM_BUDGET
    assert max(r["disk_file_bytes"] for r in rows) <= DISK_BUDGET
    assert s["requests_counter_differs_from_files_disk"] == 0

    # Memory is flat after warm-up.
    assert s["rss_baseline_bytes"] > 0
    assert s["rss_growth"] < MAX_RSS_GROWTH, (s["rss_baseline_bytes"], s["rss_final_bytes"])

    # Reuse keeps working under eviction: every window after the first hits.
    windows = s["windows"]
    assert len(windows) == REQUESTS // WINDOW
    for w in windows[1:]:
        assert w["hit_ratio"] is not None and w["hit_ratio"] > 0, w
        assert w["kv_reuse_ratio"] > 0 and w["requests_with_reuse"] > 0, w
        assert w["ttft_ms_median"] > 0 and w["ttft_ms_p95"] >= w["ttft_ms_median"]
    assert s["passed"] is True

    # The outputs the CLI writes: JSON-serialisable, and a plot.
    json.dumps(result)
    soak.plot(result, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
