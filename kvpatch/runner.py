"""The main job: run one prompt through a model unpatched and under each config, side by side.

Greedy decoding through the cache with a plain forward loop (so every step goes through the
patched path), timing prefill (TTFT) and decode separately. Used by `kvpatch run`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .compat import cache_kwarg, output_cache
from .config import ConfigSource, load_config
from .patch import apply, unpatch
from .patch.cache import cache_kv_bytes


@dataclass
class RunResult:
    """One row of the `kvpatch run` table."""

    config: str
    ttft_ms: float
    decode_tokens_per_s: float
    kv_bytes: int
    tokens: list[int]
    token_agreement: float = 1.0  # fraction of generated tokens equal to the unpatched run's
    max_first_logit_diff: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_run(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], torch.Tensor, float, float, Any]:
    """Greedy tokens, first-step logits, prefill seconds, decode seconds, and the final cache."""
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    first_logits = out.logits[0, -1].float()
    next_id = first_logits.argmax().view(1, 1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    tokens, name = [int(next_id)], cache_kwarg(model)
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=next_id, use_cache=True, **{name: output_cache(out)})
        next_id = out.logits[0, -1].argmax().view(1, 1)
        tokens.append(int(next_id))
    _sync(device)
    return tokens, first_logits, prefill_s, time.perf_counter() - start, output_cache(out)


def compare_configs(
    model: torch.nn.Module, input_ids: torch.Tensor, configs: list[ConfigSource], max_new_tokens: int, warmup: bool = True
) -> list[RunResult]:
    """The unpatched baseline row, then one row per config (each applied, run, and removed)."""
    if warmup:
        greedy_run(model, input_ids[:, :8], 2)
    tokens, logits, prefill_s, decode_s, cache = greedy_run(model, input_ids, max_new_tokens)
    baseline = RunResult("unpatched", prefill_s * 1e3, (max_new_tokens - 1) / decode_s, sum(cache_kv_bytes(cache).values()), tokens)
    rows = [baseline]
    for source in configs:
        config = load_config(source)
        handle = apply(model, config)
        try:
            if warmup:  # compile (if the config asks for it) and first-call costs stay out of the numbers
                greedy_run(model, input_ids, 3)
            got, got_logits, prefill_s, decode_s, _ = greedy_run(model, input_ids, max_new_tokens)
            stats = handle.stats()
        finally:
            unpatch(model)
        agreement = sum(a == b for a, b in zip(got, tokens)) / len(tokens)
        rows.append(
            RunResult(
                config.name,
                prefill_s * 1e3,
                (max_new_tokens - 1) / decode_s,
                stats["kv_bytes_total"],
                got,
                agreement,
                float((got_logits - logits).abs().max()),
            )
        )
    return rows


def format_table(rows: list[RunResult]) -> str:
    header = f"{'config':<14} {'TTFT ms':>9} {'decode tok/s':>13} {'KV bytes':>11} {'token match':>12} {'max |dlogit|':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.config:<14} {r.ttft_ms:>9.1f} {r.decode_tokens_per_s:>13.1f} {r.kv_bytes:>11,} "
            f"{r.token_agreement:>12.3f} {r.max_first_logit_diff:>13.2e}"
        )
    return "\n".join(lines)
