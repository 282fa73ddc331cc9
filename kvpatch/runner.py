"""The main job: run one prompt through a model unpatched and under each config, side by side.

Greedy decoding through the cache with a plain forward loop (so every step goes through the
patched path), timing prefill (TTFT) and decode separately. Every row gets the same warm-up
first (so the first row does not pay the process's warm-up and a compiled config compiles before
it is timed), then `repeats` timed runs whose medians are reported. Used by `kvpatch run`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .compat import cache_kwarg, output_cache
from .config import ConfigSource, PipelineConfig, load_config
from .patch import apply, unpatch
from .cache import cache_kv_bytes

#: Decode steps of the untimed warm-up run: prefill, the first decode step (whose cache still
#: holds the prefill's K/V views) and steady-state steps, so a compiled decoder has compiled each.
WARMUP_TOKENS = 4


@dataclass
class RunResult:
    """One row of the `kvpatch run` table (times are medians over the timed runs)."""

    config: str
    lossless: bool
    ttft_ms: float
    decode_tokens_per_s: float
    kv_bytes: int  # resident: what attention reads
    kv_bytes_offloaded: int
    tokens: list[int]
    token_agreement: float = 1.0  # generated tokens equal to the unpatched run's, over the longer run
    max_first_logit_diff: float = 0.0
    ttft_ms_runs: tuple[float, ...] = ()
    decode_tokens_per_s_runs: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Greedy:
    tokens: list[int]
    first_logits: torch.Tensor
    prefill_s: float
    decode_s: float
    cache: Any

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()  # the grad mode `generate` uses: one mode, so compiled guards never flip on it
def greedy_run(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
               eos_token_id: int | None = None) -> _Greedy:
    """Greedy tokens (stopping after EOS), first-step logits, prefill and decode seconds, and the
    final cache."""
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
    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        out = model(input_ids=next_id, use_cache=True, **{name: output_cache(out)})
        next_id = out.logits[0, -1].argmax().view(1, 1)
        tokens.append(int(next_id))
    _sync(device)
    return _Greedy(tokens, first_logits, prefill_s, time.perf_counter() - start, output_cache(out))


def _timed(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, repeats: int,
           eos_token_id: int | None) -> tuple[_Greedy, list[float], list[float]]:
    """Warm up, then `repeats` runs: the last run, and each run's TTFT (ms) and decode tok/s."""
    greedy_run(model, input_ids, min(WARMUP_TOKENS, max_new_tokens), eos_token_id)
    runs = [greedy_run(model, input_ids, max_new_tokens, eos_token_id) for _ in range(repeats)]
    return runs[-1], [r.prefill_s * 1e3 for r in runs], [r.decode_tokens_per_s for r in runs]


def agreement(reference: list[int], tokens: list[int]) -> float:
    """Share of positions where two greedy runs chose the same token (a run that stops early
    disagrees at every position it lacks)."""
    longest = max(len(reference), len(tokens))
    return sum(a == b for a, b in zip(reference, tokens)) / longest if longest else 1.0


def compare_configs(
    model: torch.nn.Module, input_ids: torch.Tensor, configs: list[ConfigSource], max_new_tokens: int,
    repeats: int = 3, eos_token_id: int | None = None,
) -> list[RunResult]:
    """The unpatched baseline row, then one row per config (each applied, run, and removed)."""
    base, ttft, rate = _timed(model, input_ids, max_new_tokens, repeats, eos_token_id)
    rows = [RunResult("unpatched", True, statistics.median(ttft), statistics.median(rate),
                      sum(cache_kv_bytes(base.cache).values()), 0, base.tokens,
                      ttft_ms_runs=tuple(ttft), decode_tokens_per_s_runs=tuple(rate))]
    for source in configs:
        config: PipelineConfig = load_config(source)
        handle = apply(model, config)
        try:
            got, ttft, rate = _timed(model, input_ids, max_new_tokens, repeats, eos_token_id)
            stats = handle.stats()
        finally:
            unpatch(model)
        rows.append(RunResult(
            config.name, config.fidelity.lossless, statistics.median(ttft), statistics.median(rate),
            stats["kv_bytes_resident"], stats["kv_bytes_offloaded"], got.tokens,
            agreement(base.tokens, got.tokens), float((got.first_logits - base.first_logits).abs().max()),
            tuple(ttft), tuple(rate),
        ))
    return rows


def format_table(rows: list[RunResult]) -> str:
    """Fixed-width table; `KV frac` is resident bytes over the unpatched row's."""
    header = (f"{'config':<14} {'TTFT ms':>9} {'decode tok/s':>13} {'KV bytes':>11} {'KV frac':>8} "
              f"{'token match':>12} {'max |dlogit|':>13}")
    base = rows[0].kv_bytes or 1
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.config:<14} {r.ttft_ms:>9.1f} {r.decode_tokens_per_s:>13.1f} {r.kv_bytes:>11,} {r.kv_bytes / base:>8.3f} "
            f"{r.token_agreement:>12.3f} {r.max_first_logit_diff:>13.2e}"
        )
    return "\n".join(lines)


def continuations(rows: list[RunResult], decode: Any) -> list[str]:
    """The unpatched continuation, naming the configs that produced exactly it, then each config
    whose continuation differs, under its own name."""
    base = rows[0]
    same = [r.config for r in rows[1:] if r.tokens == base.tokens]
    lines = [f"continuation (unpatched{'; identical: ' + ', '.join(same) if same else ''}): {decode(base.tokens)!r}"]
    lines += [f"continuation ({r.config}): {decode(r.tokens)!r}" for r in rows[1:] if r.tokens != base.tokens]
    return lines
