"""Launch settings of the fused decode kernel: the measured defaults, and the knobs benchmarks sweep.

Kept apart from the kernel so that `decode_attention` takes the attention problem (query, K/V,
scaling, mask, lengths) plus one optional `DecodeTuning`, and so that every default says which
sweep chose it, as a table of autotune configs would. `plan` turns the knobs a caller set into
the complete launch for one kind of stored K/V; `split_count` sizes the split-K grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

#: What the kernel reads besides the dense parts: KIVI codes, FibQuant codes, or nothing.
CodeKind = Literal["kivi", "fibquant", "dense"]

#: The split policy when none is given (see `split_count`): "wave4" for the fp16-dequant KIVI loop
#: (results/kernels-h100-v5.json), "cover8" elsewhere (results/kernels-h100-v1-sweep.json; dense:
#: results/kernels-h200-dense-splits.jsonl).
DEFAULT_SPLIT_POLICY = {"kivi-fast": "wave4", "kivi": "cover8", "fibquant": "cover8", "dense": "cover8"}
#: FibQuant tiles are 64 tokens whatever `block_n` says (its gather's register peak).
FIBQUANT_BLOCK_N = 64
#: A dense-only cache gets at least this many tiles per split (within 15% of the best of the H200
#: sweep at B 1 and 8, T 8K and 32K: results/kernels-h200-dense-splits.jsonl).
DENSE_MIN_TILES_PER_SPLIT = 8


@dataclass(frozen=True)
class DecodeTuning:
    """Knobs of one `decode_attention` launch; None = the measured default for the call.

    `num_splits` (per batch x kv head; else from `split_policy`), `block_n` (tokens per tile: 128
    with `fast_cvt`, else 64), `num_warps`, `num_stages` (2 with `fast_cvt`, else 3: the H100
    sweeps v4 / v1). `fast_cvt` (default on the GPU for bf16/fp16 queries) dequantizes codes in
    fp16 with inline PTX. `score_join` interleaves the per-field score tiles into one natural-order
    tile (off: slower for int4 and int2 in results/kernels-h100-v5.json). `maxnreg` caps registers
    per thread (default 128 for the fp16 KIVI loop at 4 warps, else no cap; 0 = no cap).
    `dense_block_n` is the tile of the small bf16 sinks/residual part next to codes.
    """

    num_splits: int | None = None
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int | None = None
    fast_cvt: bool | None = None
    score_join: bool = False
    maxnreg: int | None = None
    dense_block_n: int = 64
    split_policy: str | None = None


@dataclass(frozen=True)
class LaunchPlan:
    """A complete launch: every knob decided for one kind of stored K/V."""

    block_n: int
    num_warps: int
    num_stages: int
    fast_cvt: bool  # the kernel's FAST_CVT flag (never for FibQuant)
    score_join: bool
    maxnreg: int  # 0 = no cap
    dense_block_n: int
    num_splits: int | None
    split_policy: str


def plan(tuning: DecodeTuning | None, codes: CodeKind, query_dtype: torch.dtype, interpret: bool,
         group_size: int = 1) -> LaunchPlan:
    """The launch for `codes` given the caller's knobs (`group_size`: KIVI's, a tile's minimum)."""
    t = tuning or DecodeTuning()
    fast = t.fast_cvt if t.fast_cvt is not None else (not interpret and query_dtype != torch.float32)
    block_n = t.block_n if t.block_n is not None else (128 if fast else 64)  # fp32 dequant spills at 128
    if codes == "fibquant":
        block_n = FIBQUANT_BLOCK_N
    elif codes == "kivi":
        block_n = max(block_n, group_size)
    if t.maxnreg is not None:
        maxnreg = t.maxnreg
    else:  # 4 programs of 4 warps per SM for the fp16 KIVI loop (results/kernels-h100-v5.json)
        maxnreg = 128 if t.num_warps == 4 and fast and codes == "kivi" else 0
    policy_key = "kivi-fast" if codes == "kivi" and fast else codes
    return LaunchPlan(
        block_n=block_n,
        num_warps=t.num_warps,
        num_stages=t.num_stages if t.num_stages is not None else (2 if fast else 3),
        fast_cvt=fast and codes != "fibquant",
        score_join=t.score_join,
        maxnreg=maxnreg,
        dense_block_n=min(t.dense_block_n, block_n) if codes != "dense" else block_n,
        num_splits=t.num_splits,
        split_policy=t.split_policy or DEFAULT_SPLIT_POLICY[policy_key],
    )


def split_count(launch: LaunchPlan, codes: CodeKind, tiles: int, programs: int, device: torch.device) -> int:
    """Splits per (batch, kv head) for `tiles` tiles and `programs` = batch x kv heads: the
    caller's `num_splits`, else the policy (capped for a dense-only cache, whose splits share
    the residual buffer's capacity)."""
    if launch.num_splits:
        return launch.num_splits
    splits = policy_splits(tiles, programs, device, launch.split_policy)
    if codes == "dense":
        splits = min(splits, max(1, tiles // DENSE_MIN_TILES_PER_SPLIT))
    return splits


def policy_splits(tiles: int, programs: int, device: torch.device, policy: str) -> int:
    """Splits per (batch, kv head), at least one tile each. `policy`:
    - "coverN": enough splits that the code programs cover the device N programs per SM over;
    - "waveN": the most splits for which the code programs fit in one wave of N programs per SM
      (no half-empty last wave; the one short dense program per (batch, kv head) is not counted:
      counting it cost B=32 half its splits, results/kernels-h100-splits.json)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    kind, per_sm = policy.rstrip("0123456789"), int(policy[len(policy.rstrip("0123456789")):] or 0)
    if kind not in ("cover", "wave") or per_sm < 1:
        raise ValueError(f"split_policy {policy!r}: expected 'coverN' or 'waveN' with N >= 1")
    if kind == "wave":
        return max(1, min(tiles, per_sm * sms // programs))
    return max(1, min(tiles, -(-per_sm * sms // programs)))
