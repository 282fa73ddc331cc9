"""Fused decode attention over a cache layer's stored parts: full-precision sinks and residual,
and KIVI codes read packed (no dequantized copy of K/V ever reaches device memory).

Decode attention is memory-bound, so the kernel's job is to read each stored byte once:
- split-K (flash-decoding): program (split, batch x kv head) runs an online softmax over one
  range of the quantized tokens; one extra split per (batch, kv head) covers the small dense
  parts (sinks + residual). Without codes (a full-precision cache) the splits share the residual
  instead and the extra one takes the sinks. A second kernel merges the splits' partial (max,
  sum, output).
- GQA: the rows of a program are all the query heads of one kv head times the Tq queries, so one
  read of K/V serves the whole group (rows padded to 16 for the tensor-core dot).
- KIVI codes are read in `quantizer/kivi`'s packed layout (unchanged) and never unpacked into
  natural order: each bit field of a byte tile is a dot operand of its own (keys: one QK dot per
  field = tokens j*per_byte + f; values: one accumulator per field = channels c*per_byte + f),
  see `_kivi_part` (triton_kivi.py). On the GPU the codes are dequantized in fp16 by inline PTX.
- FibQuant codes (one byte per block of coordinates + a norm per token) are attended in the codes'
  rotated space: q and the dense parts are rotated once per call, each tile gathers codebook rows
  by index (`_fibquant_part`, triton_fibquant.py), and the merged output is rotated back.
- Masking: bottom-right causal per sequence length (`lengths`, else the cache length), and an
  optional boolean mask [B, Tq, Tk] (transformers' padding mask). A row that sees no key
  returns zeros, never NaN.
- Static layers (CUDA graphs): the buffers have a fixed capacity and the kernel reads how much of
  them is valid from device memory (`PackedKV.counts`: code blocks, first residual slot,
  residual tokens; the residual is a ring), so one captured launch serves every decode step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..quant.kernel_layouts import FibQuantCodes, KiviPacking
from .decode_tuning import DecodeTuning, plan, split_count
from .packed import PackedKV
from .triton_fibquant import _fibquant_part
from .triton_kivi import _kivi_part
from .triton_softmax import NEG, _attend, _visible
from .triton_support import interpreting

LOG2E = 1.4426950408889634
#: Decode only: more query rows per kv head than this go to SDPA (prefill).
MAX_QUERY_ROWS = 64
#: Splits whose partial sums `_decode_reduce` loads at once (a [SB, head_dim] fp32 tile).
REDUCE_SPLITS_PER_LOAD = 32


@triton.jit
def _dense_part(q, m_i, l_i, acc, K, V, bh, T, first, count, start, limit, qi, MASK, sm_b, sm_t, b,
                tile_lo, tile_hi, HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    """Online softmax over tiles [tile_lo, tile_hi) of the `count` tokens of a [B, Hkv, T, D] K/V
    ring starting at slot `first` (a plain buffer: first 0, count T); token i is at sequence
    position `start + i`."""
    n = tl.arange(0, BN)
    d = tl.arange(0, D)
    base = bh.to(tl.int64) * T * D
    for t in range(tile_lo, tile_hi):
        tok = t * BN + n
        inside = tok < count
        slot = (first + tok) % T
        k = tl.load(K + base + slot[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + base + slot[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        valid = _visible(start + tok, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & inside[None, :]
        m_i, l_i, acc = _attend(q, tl.trans(k), v, valid, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, r_first, r_count, NQ, bh, limit, qi, MASK, sm_b,
                 sm_t, b, HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    """The sinks (tokens [0, S)) and the residual (after the NQ quantized tokens)."""
    m_i, l_i, acc = _dense_part(q, m_i, l_i, acc, SK, SV, bh, S, 0, S, 0, limit, qi, MASK, sm_b, sm_t, b,
                                0, tl.cdiv(S, BN), HAS_MASK, D, BN)
    return _dense_part(q, m_i, l_i, acc, RK, RV, bh, R, r_first, r_count, S + NQ, limit, qi, MASK, sm_b,
                       sm_t, b, 0, tl.cdiv(r_count, BN), HAS_MASK, D, BN)


@triton.jit
def _decode_partial(
    Q, sq_b, sq_h, sq_t, qk_scale,
    SK, SV, S, RK, RV, R,
    KP, KS, KZ, VP, VS, VZ, NBLK_CAP, NSPLIT, COUNTS,
    MASK, sm_b, sm_t, LENGTHS,
    O_PART, M_PART, L_PART,
    HKV: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    HAS_CODES: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_COUNTS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FAST_CVT: tl.constexpr, FIBQUANT: tl.constexpr, BD: tl.constexpr,
    SCORE_JOIN: tl.constexpr,
    DENSE_BN: tl.constexpr,
):
    """One split of one (batch, kv head). Code operands: KIVI (KP, KS, KZ / VP, VS, VZ) = packed
    codes, scales, zeros; FibQuant (FIBQUANT, G = 1) = indices, norms, codebook."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = tl.arange(0, BM)
    d = tl.arange(0, D)
    qi = rows % TQ
    head = h * GQA + rows // TQ
    has_row = rows < GQA * TQ
    q = tl.load(Q + b.to(tl.int64) * sq_b + head[:, None] * sq_h + qi[:, None] * sq_t + d[None, :],
                mask=has_row[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale
    if not DOT_FP32:
        q = q.to(Q.dtype.element_ty)
    if HAS_COUNTS:
        NBLK = tl.load(COUNTS).to(tl.int32)
        r_first = tl.load(COUNTS + 1).to(tl.int32)
        r_count = tl.load(COUNTS + 2).to(tl.int32)
    else:
        NBLK = NBLK_CAP
        r_first = 0
        r_count = R
    NQ = NBLK * G
    if HAS_LENGTHS:
        seq_len = tl.load(LENGTHS + b)
    else:
        seq_len = S + NQ + r_count
    limit = seq_len - TQ + 1 + qi
    m_i = tl.full([BM], NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if HAS_CODES:
        if split < NSPLIT:
            tiles = tl.cdiv(NQ, BN)
            per_split = tl.cdiv(tiles, NSPLIT)
            lo = split * per_split
            # tiles past this sequence's length are never read
            hi = tl.minimum(tl.minimum(lo + per_split, tiles), tl.cdiv(tl.maximum(seq_len - S, 0), BN))
            if FIBQUANT:
                m_i, l_i, acc = _fibquant_part(q, m_i, l_i, acc, KP, KS, KZ, VP, VS, VZ, bh, NBLK_CAP, NQ, lo, hi,
                                               S, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK, D, BN, BD)
            else:
                m_i, l_i, acc = _kivi_part(q, m_i, l_i, acc, KP, KS, KZ, VP, VS, VZ, bh, NBLK_CAP, NBLK, lo, hi, S,
                                           limit, qi, MASK, sm_b, sm_t, b, HAS_MASK, D, BN, G, BITS,
                                           FAST_CVT, SCORE_JOIN)
        else:
            m_i, l_i, acc = _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, r_first, r_count, NQ, bh,
                                         limit, qi, MASK, sm_b, sm_t, b, HAS_MASK, D, DENSE_BN)
    elif split < NSPLIT:
        # full precision only (a dense cache, or a static buffer valid up to COUNTS): the splits
        # share the tiles of the valid tokens, flash-decoding style; tiles past them are never read
        tiles = tl.cdiv(r_count, DENSE_BN)
        per_split = tl.cdiv(tl.cdiv(R, DENSE_BN), NSPLIT)
        lo = split * per_split
        hi = tl.minimum(lo + per_split, tiles)
        m_i, l_i, acc = _dense_part(q, m_i, l_i, acc, RK, RV, bh, R, r_first, r_count, S, limit, qi, MASK, sm_b,
                                    sm_t, b, lo, hi, HAS_MASK, D, DENSE_BN)
    else:
        m_i, l_i, acc = _dense_part(q, m_i, l_i, acc, SK, SV, bh, S, 0, S, 0, limit, qi, MASK, sm_b, sm_t, b,
                                    0, tl.cdiv(S, DENSE_BN), HAS_MASK, D, DENSE_BN)
    rows_out = (bh * (NSPLIT + 1) + split) * (GQA * TQ) + rows
    tl.store(M_PART + rows_out, m_i, mask=has_row)
    tl.store(L_PART + rows_out, l_i, mask=has_row)
    tl.store(O_PART + rows_out.to(tl.int64)[:, None] * D + d[None, :], acc, mask=has_row[:, None])


@triton.jit
def _decode_reduce(
    O_PART, M_PART, L_PART, OUT, so_b, so_h, so_t, NS,
    HKV: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, SB: tl.constexpr,
):
    """Joins the splits of one query row (one program per batch x kv head x row): SB splits'
    partial sums at a time, loaded together. A loop over single splits with dependent loads took
    12 us per layer at 33 splits on the H200 (a third of the partial kernel's time)."""
    pid = tl.program_id(0)
    bh = pid // (GQA * TQ)
    row = pid % (GQA * TQ)
    b = bh // HKV
    h = bh % HKV
    d = tl.arange(0, D)
    m_t = tl.max(tl.full([SB], NEG, tl.float32), axis=0)
    l_t = tl.sum(tl.zeros([SB], tl.float32), axis=0)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, NS, SB):
        s = s0 + tl.arange(0, SB)
        ok = s < NS
        r = (bh * NS + s) * (GQA * TQ) + row
        m_s = tl.load(M_PART + r, mask=ok, other=NEG)
        l_s = tl.load(L_PART + r, mask=ok, other=0.0)
        o_s = tl.load(O_PART + r.to(tl.int64)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_t, tl.max(m_s, axis=0))
        a = tl.exp2(m_t - m_new)
        w = tl.exp2(m_s - m_new)
        acc = acc * a + tl.sum(o_s * w[:, None], axis=0)
        l_t = l_t * a + tl.sum(l_s * w, axis=0)
        m_t = m_new
    out = acc / tl.where(l_t > 0, l_t, 1.0)
    head = h * GQA + row // TQ
    qi = row % TQ
    ptr = OUT + b.to(tl.int64) * so_b + head * so_h + qi * so_t + d
    tl.store(ptr, out.to(OUT.dtype.element_ty))


def unsupported_reason(query: torch.Tensor, kv: PackedKV, mask: torch.Tensor | None) -> str | None:
    """None if `decode_attention` computes this call, else why not (the caller falls back)."""
    _, q_heads, q_len, dim = query.shape
    kv_heads = kv.keys.shape[1]
    if dim < 16 or dim & (dim - 1):
        return f"head_dim {dim} is not a power of two >= 16"
    if q_heads % kv_heads:
        return f"{q_heads} query heads are not a multiple of {kv_heads} kv heads"
    if q_heads // kv_heads * q_len > MAX_QUERY_ROWS:
        return f"{q_len} queries x {q_heads // kv_heads} heads per kv head is prefill, not decode"
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1):
        return "only boolean masks of shape [B, 1, Tq, Tk] are supported"
    if kv.key_codes is not None:
        layout = kv.kernel_layout()
        if isinstance(layout, FibQuantCodes):
            block_dim, code_bits = layout.block_dim, layout.code_bits
            if code_bits != 8 or block_dim & (block_dim - 1) or dim % block_dim:
                return (f"FibQuant code_bits {code_bits} / block_dim {block_dim} (fused: 8-bit indices, a "
                        "power-of-two block dividing head_dim)")
            return None
        if not isinstance(layout, KiviPacking):
            return (f"codes of quantizer {getattr(kv.quantizer, 'name', kv.quantizer)!r} declare no fused layout "
                    "(kernel_layout(): KiviPacking or FibQuantCodes)")
        bits, group = layout.bits, layout.group_size
        if group & (group - 1) or group * bits < 8 or dim % group:
            return f"KIVI group_size {group} (needs a power of two dividing head_dim, >= {8 // bits})"
    return None


_ROTATION_MATRICES: dict[tuple[int, int, torch.device], tuple[object, torch.Tensor]] = {}


def _rotation_matrix(rotation: object, dim: int, device: torch.device) -> torch.Tensor:
    """The [dim, dim] matrix M with rotation.forward(u) = u @ M (M orthogonal), built once per
    rotation object: one matmul per tensor instead of a Walsh-Hadamard transform's ~30 launches."""
    key = (id(rotation), dim, device)
    cached = _ROTATION_MATRICES.get(key)
    if cached is None or cached[0] is not rotation:
        cached = (rotation, rotation.forward(torch.eye(dim, device=device)))
        _ROTATION_MATRICES[key] = cached
    return cached[1]


def _code_operands(kv: PackedKV, kind: str, device: torch.device, dim: int, residual_k: torch.Tensor,
                   block_n: int) -> tuple[list[torch.Tensor], int, int, int, int, int]:
    """The kernel's six code operands and (bits, group, code blocks, block_dim, tokens the splits
    cover). A dense-only cache passes the residual as placeholders and its splits cover the
    residual buffer's capacity (fixed for a static layer's graph)."""
    if kind == "dense":
        return [residual_k] * 6, 8, block_n, 0, 1, residual_k.shape[-2]
    kt, vt = kv.key_codes.tensors, kv.value_codes.tensors
    n_blocks = kv.key_codes.num_blocks
    if kind == "fibquant":
        layout = kv.kernel_layout()
        codes = [kt["index"], kt["norm"], kv.quantizer.codebook("key", dim, device),
                 vt["index"], vt["norm"], kv.quantizer.codebook("value", dim, device)]
        return [t.contiguous() for t in codes], layout.code_bits, 1, n_blocks, layout.block_dim, n_blocks
    layout = kv.kernel_layout()
    codes = [kt["packed"], kt["scale"], kt["zero"], vt["packed"], vt["scale"], vt["zero"]]
    return [t.contiguous() for t in codes], layout.bits, layout.group_size, n_blocks, 1, n_blocks * layout.group_size


def decode_attention(
    query: torch.Tensor,
    kv: PackedKV,
    scaling: float,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    tuning: DecodeTuning | None = None,
) -> torch.Tensor:
    """Attention of query `[B, Hq, Tq, D]` over every token of `kv`; returns `[B, Hq, Tq, D]`.

    `mask` is boolean `[B or 1, 1, Tq or 1, >= Tk]` (True = attend); `lengths` (int `[B]`) limits
    sequence b to its first `lengths[b]` tokens, the last query seeing all of them. `tuning`
    overrides the measured launch defaults (decode_tuning.py; tools/bench_kernels.py sweeps them).
    """
    reason = unsupported_reason(query, kv, mask)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    batch, q_heads, q_len, dim = query.shape
    kv_heads = kv.keys.shape[1]
    layout = kv.kernel_layout() if kv.key_codes is not None else None
    fibquant = layout if isinstance(layout, FibQuantCodes) else None
    kind = "fibquant" if fibquant is not None else ("kivi" if layout is not None else "dense")
    launch = plan(tuning, kind, query.dtype, interpreting(), layout.group_size if kind == "kivi" else 1)
    gqa = q_heads // kv_heads
    rows = gqa * q_len
    block_m = max(16, triton.next_power_of_2(rows))
    rotate: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # noqa: E731
    if fibquant is not None:  # everything in the codes' rotated space: q.k and sum(p v) are invariant
        matrix = _rotation_matrix(kv.quantizer.rotation(dim, query.device), dim, query.device)
        rotate = lambda t: (t.float() @ matrix).to(t.dtype)  # noqa: E731
        query = rotate(query)
    residual_k, residual_v = rotate(kv.keys).contiguous(), rotate(kv.values).contiguous()
    sink_k = rotate(kv.sink_keys).contiguous() if kv.sink_keys is not None else residual_k
    sink_v = rotate(kv.sink_values).contiguous() if kv.sink_values is not None else residual_v
    codes, bits, group, n_blocks, block_dim, tokens = _code_operands(kv, kind, query.device, dim, residual_k,
                                                                     launch.block_n)
    splits = split_count(launch, kind, triton.cdiv(tokens, launch.block_n), batch * kv_heads, query.device)
    if mask is not None:
        # a contiguous byte copy of [B, Tq, Tk] (small; inductor cannot lower a bool -> uint8 view);
        # a static layer's mask spans its capacity and is read only up to the valid tokens
        width = mask.shape[-1] if kv.counts is not None else kv.num_tokens
        mask = mask[:, 0, :, :width].to(torch.uint8, memory_format=torch.contiguous_format)
        mask_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1) if mask.shape[1] > 1 else 0)
    else:
        mask_strides = (0, 0)
    f32 = {"device": query.device, "dtype": torch.float32}
    o_part = torch.empty(batch * kv_heads * (splits + 1) * rows, dim, **f32)
    m_part = torch.empty(batch * kv_heads * (splits + 1) * rows, **f32)
    l_part = torch.empty_like(m_part)
    out = torch.empty(batch, q_heads, q_len, dim, device=query.device,
                      dtype=torch.float32 if fibquant is not None else query.dtype)
    flags = {"HKV": kv_heads, "GQA": gqa, "TQ": q_len, "D": dim, "BM": block_m}
    _decode_partial[(splits + 1, batch * kv_heads)](
        query, *query.stride()[:3], scaling * LOG2E,
        sink_k, sink_v, kv.sink_length, residual_k, residual_v, residual_k.shape[-2],
        *codes, n_blocks, splits, kv.counts if kv.counts is not None else residual_k,
        mask if mask is not None else residual_k, *mask_strides,
        lengths.to(torch.int32) if lengths is not None else residual_k,
        o_part, m_part, l_part,
        BN=launch.block_n, G=group, BITS=bits, HAS_CODES=kv.key_codes is not None,
        HAS_MASK=mask is not None, HAS_LENGTHS=lengths is not None, HAS_COUNTS=kv.counts is not None,
        DOT_FP32=interpreting() or query.dtype == torch.float32, FAST_CVT=launch.fast_cvt,
        FIBQUANT=fibquant is not None, BD=block_dim, SCORE_JOIN=launch.score_join, DENSE_BN=launch.dense_block_n,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
        **({"maxnreg": launch.maxnreg} if launch.maxnreg and not interpreting() else {}), **flags,
    )
    _decode_reduce[(batch * kv_heads * rows,)](
        o_part, m_part, l_part, out, *out.stride()[:3], splits + 1, HKV=kv_heads, GQA=gqa, TQ=q_len, D=dim,
        SB=min(REDUCE_SPLITS_PER_LOAD, triton.next_power_of_2(splits + 1)), num_warps=2,
    )
    if fibquant is not None:
        return (out @ matrix.T).to(query.dtype)
    return out
