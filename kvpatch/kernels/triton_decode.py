"""Fused decode attention over a cache layer's stored parts: full-precision sinks and residual,
and KIVI codes read packed (no dequantized copy of K/V ever reaches device memory).

Decode attention is memory-bound, so the kernel's job is to read each stored byte once:
- split-K (flash-decoding): program (split, batch x kv head) runs an online softmax over one
  range of the quantized tokens; one extra split per (batch, kv head) covers the small dense
  parts (sinks + residual). A second kernel merges the splits' partial (max, sum, output).
- GQA: the rows of a program are all the query heads of one kv head times the Tq queries, so one
  read of K/V serves the whole group (rows padded to 16 for the tensor-core dot).
- KIVI keys are stored per block of G tokens channel-major (`quantizer/kivi`'s layout, unchanged):
  a tile of NG blocks loads as [D, NG, G/per_byte] bytes, unpacks with shifts and `tl.join`
  into natural token order, and dequantizes with the block's per-channel scale and zero
  (fp32, `code * scale + zero`, the torch decode's formula) before the dot.
- Masking: bottom-right causal per sequence length (`lengths`, else the cache length), and an
  optional boolean mask [B, Tq, Tk] (transformers' padding mask). A row that sees no key
  returns zeros, never NaN.
- Static layers (CUDA graphs): the buffers have a fixed capacity and the kernel reads how much of
  them is valid from device memory (`PackedKV.counts`: code blocks, first residual slot,
  residual tokens; the residual is a ring), so one captured launch serves every decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import PackedKV, kivi_layout
from .triton_support import interpreting

LOG2E = 1.4426950408889634
#: Running-max start: finite, so a fully masked tile gives exp2(-inf) = 0 and never inf - inf.
NEG = tl.constexpr(-1.0e30)
#: Decode only: more query rows per kv head than this go to SDPA (prefill).
MAX_QUERY_ROWS = 64


@triton.jit
def _unpack(b, BITS: tl.constexpr):
    """uint8 [..., n] -> codes [..., n, 8 // BITS], field r (bits r*BITS..) at index r."""
    if BITS == 4:
        x = tl.join(b & 15, b >> 4)
    elif BITS == 2:
        # join(join(f0, f2), join(f1, f3))[..., y, x] = f[2y + x]
        x = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
    else:
        x = b
    return x


@triton.jit
def _attend(q, k, v, valid, m_i, l_i, acc):
    """One online-softmax step (base 2; q carries scale * log2(e)) over a tile k [D, N], v [N, D]."""
    s = tl.dot(q, k.to(q.dtype))
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def _visible(pos, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK: tl.constexpr):
    """[rows, N] keys each query row may see: causal bottom-right, and the boolean mask."""
    valid = pos[None, :] < limit[:, None]
    if HAS_MASK:
        allowed = tl.load(MASK + b * sm_b + qi[:, None] * sm_t + pos[None, :], mask=valid, other=0)
        valid = valid & (allowed != 0)
    return valid


@triton.jit
def _dense_part(q, m_i, l_i, acc, K, V, bh, T, first, count, start, limit, qi, MASK, sm_b, sm_t, b,
                HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    """Online softmax over `count` tokens of a [B, Hkv, T, D] K/V ring starting at slot `first`
    (a plain buffer: first 0, count T); token i is at sequence position `start + i`."""
    n = tl.arange(0, BN)
    d = tl.arange(0, D)
    base = bh.to(tl.int64) * T * D
    for t in range(tl.cdiv(count, BN)):
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
                                HAS_MASK, D, BN)
    return _dense_part(q, m_i, l_i, acc, RK, RV, bh, R, r_first, r_count, S + NQ, limit, qi, MASK, sm_b,
                       sm_t, b, HAS_MASK, D, BN)


@triton.jit
def _kivi_part(q, m_i, l_i, acc, KP, KS, KZ, VP, VS, VZ, bh, NBLK_CAP, NBLK, tile_lo, tile_hi, start, limit,
               qi, MASK, sm_b, sm_t, b, HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
               G: tl.constexpr, BITS: tl.constexpr):
    """Online softmax over tiles [tile_lo, tile_hi) of BN tokens of KIVI codes, read packed: the
    first NBLK of buffers holding NBLK_CAP blocks per (batch, kv head)."""
    PB: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // PB
    NG: tl.constexpr = BN // G
    NGV: tl.constexpr = D // G
    DB: tl.constexpr = D // PB
    NQ = NBLK * G
    bh64 = bh.to(tl.int64)
    kp, ks = KP + bh64 * NBLK_CAP * D * GB, bh64 * NBLK_CAP * D
    vp, vs = VP + bh64 * NBLK_CAP * G * DB, bh64 * NBLK_CAP * G * NGV
    d = tl.arange(0, D)
    g = tl.arange(0, NG)
    j = tl.arange(0, GB)
    n = tl.arange(0, BN)
    c = tl.arange(0, DB)
    gv = tl.arange(0, NGV)
    for t in range(tile_lo, tile_hi):
        blk = t * NG + g
        has_blk = blk < NBLK
        kb = tl.load(kp + blk[None, :, None] * (D * GB) + d[:, None, None] * GB + j[None, None, :],
                     mask=has_blk[None, :, None], other=0)
        kc = tl.reshape(_unpack(kb, BITS), (D, NG, G)).to(tl.float32)
        sidx = ks + blk[None, :] * D + d[:, None]
        k_scale = tl.load(KS + sidx, mask=has_blk[None, :], other=0.0).to(tl.float32)
        k_zero = tl.load(KZ + sidx, mask=has_blk[None, :], other=0.0).to(tl.float32)
        k = tl.reshape(kc * k_scale[:, :, None] + k_zero[:, :, None], (D, BN))

        tok = t * BN + n
        has_tok = tok < NQ
        vb = tl.load(vp + tok[:, None] * DB + c[None, :], mask=has_tok[:, None], other=0)
        vc = tl.reshape(_unpack(vb, BITS), (BN, NGV, G)).to(tl.float32)
        vidx = vs + tok[:, None] * NGV + gv[None, :]
        v_scale = tl.load(VS + vidx, mask=has_tok[:, None], other=0.0).to(tl.float32)
        v_zero = tl.load(VZ + vidx, mask=has_tok[:, None], other=0.0).to(tl.float32)
        v = tl.reshape(vc * v_scale[:, :, None] + v_zero[:, :, None], (BN, D))

        valid = _visible(start + tok, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & has_tok[None, :]
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc)
    return m_i, l_i, acc


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
):
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
            m_i, l_i, acc = _kivi_part(q, m_i, l_i, acc, KP, KS, KZ, VP, VS, VZ, bh, NBLK_CAP, NBLK, lo, hi, S,
                                       limit, qi, MASK, sm_b, sm_t, b, HAS_MASK, D, BN, G, BITS)
        else:
            m_i, l_i, acc = _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, r_first, r_count, NQ, bh,
                                         limit, qi, MASK, sm_b, sm_t, b, HAS_MASK, D, BN)
    else:
        m_i, l_i, acc = _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, r_first, r_count, NQ, bh,
                                     limit, qi, MASK, sm_b, sm_t, b, HAS_MASK, D, BN)
    rows_out = (bh * (NSPLIT + 1) + split) * (GQA * TQ) + rows
    tl.store(M_PART + rows_out, m_i, mask=has_row)
    tl.store(L_PART + rows_out, l_i, mask=has_row)
    tl.store(O_PART + rows_out.to(tl.int64)[:, None] * D + d[None, :], acc, mask=has_row[:, None])


@triton.jit
def _decode_reduce(
    O_PART, M_PART, L_PART, OUT, so_b, so_h, so_t, NS,
    HKV: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    rows = tl.arange(0, BM)
    d = tl.arange(0, D)
    has_row = rows < GQA * TQ
    m_t = tl.full([BM], NEG, tl.float32)
    l_t = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for s in range(NS):
        r = (bh * NS + s) * (GQA * TQ) + rows
        m_s = tl.load(M_PART + r, mask=has_row, other=NEG)
        l_s = tl.load(L_PART + r, mask=has_row, other=0.0)
        o_s = tl.load(O_PART + r.to(tl.int64)[:, None] * D + d[None, :], mask=has_row[:, None], other=0.0)
        m_new = tl.maximum(m_t, m_s)
        a = tl.exp2(m_t - m_new)
        w = tl.exp2(m_s - m_new)
        acc = acc * a[:, None] + o_s * w[:, None]
        l_t = l_t * a + l_s * w
        m_t = m_new
    out = acc / tl.where(l_t > 0, l_t, 1.0)[:, None]
    head = h * GQA + rows // TQ
    qi = rows % TQ
    ptr = OUT + b.to(tl.int64) * so_b + head[:, None] * so_h + qi[:, None] * so_t + d[None, :]
    tl.store(ptr, out.to(OUT.dtype.element_ty), mask=has_row[:, None])


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
        layout = kivi_layout(kv.quantizer)
        if layout is None:
            return f"codes of quantizer {getattr(kv.quantizer, 'name', kv.quantizer)!r} (only KIVI is fused)"
        bits, group = layout
        if group & (group - 1) or group * bits < 8 or dim % group:
            return f"KIVI group_size {group} (needs a power of two dividing head_dim, >= {8 // bits})"
    return None


def _num_splits(tiles: int, programs: int, device: torch.device) -> int:
    """Enough splits that the grid covers the device ~8 times over (better than 4x for int4 and
    int2 in the H100 sweep, results/kernels-h100-v1-sweep.json), at least one tile each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(tiles, triton.cdiv(8 * sms, programs)))


def decode_attention(
    query: torch.Tensor,
    kv: PackedKV,
    scaling: float,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Attention of query `[B, Hq, Tq, D]` over every token of `kv`; returns `[B, Hq, Tq, D]`.

    `mask` is boolean `[B or 1, 1, Tq or 1, >= Tk]` (True = attend); `lengths` (int `[B]`) limits
    sequence b to its first `lengths[b]` tokens, the last query seeing all of them.
    `num_splits`, `block_n` (tokens per tile), `num_warps`, `num_stages` are tuning knobs
    (tools/bench_kernels.py sweeps them); the defaults are the best measured on an H100.
    """
    reason = unsupported_reason(query, kv, mask)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    batch, q_heads, q_len, dim = query.shape
    kv_heads = kv.keys.shape[1]
    gqa = q_heads // kv_heads
    rows = gqa * q_len
    block_m = max(16, triton.next_power_of_2(rows))
    residual_k, residual_v = kv.keys.contiguous(), kv.values.contiguous()
    sink_k = kv.sink_keys.contiguous() if kv.sink_keys is not None else residual_k
    sink_v = kv.sink_values.contiguous() if kv.sink_values is not None else residual_v
    if kv.key_codes is not None:
        bits, group = kivi_layout(kv.quantizer)
        kt, vt = kv.key_codes.tensors, kv.value_codes.tensors
        codes = [kt["packed"], kt["scale"], kt["zero"], vt["packed"], vt["scale"], vt["zero"]]
        codes = [t.contiguous() for t in codes]
        n_blocks = kv.key_codes.num_blocks
        block_n = max(block_n, group)
        splits = num_splits or _num_splits(triton.cdiv(n_blocks * group, block_n), batch * kv_heads, query.device)
    else:
        bits, group, n_blocks, splits = 8, block_n, 0, 0
        codes = [residual_k] * 6
    if mask is not None:
        # a contiguous byte copy of [B, Tq, Tk] (small; inductor cannot lower a bool -> uint8 view)
        mask = mask[:, 0, :, : kv.num_tokens].to(torch.uint8, memory_format=torch.contiguous_format)
        mask_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1) if mask.shape[1] > 1 else 0)
    else:
        mask_strides = (0, 0)
    f32 = {"device": query.device, "dtype": torch.float32}
    o_part = torch.empty(batch * kv_heads * (splits + 1) * rows, dim, **f32)
    m_part = torch.empty(batch * kv_heads * (splits + 1) * rows, **f32)
    l_part = torch.empty_like(m_part)
    out = torch.empty(batch, q_heads, q_len, dim, device=query.device, dtype=query.dtype)
    flags = {"HKV": kv_heads, "GQA": gqa, "TQ": q_len, "D": dim, "BM": block_m}
    _decode_partial[(splits + 1, batch * kv_heads)](
        query, *query.stride()[:3], scaling * LOG2E,
        sink_k, sink_v, kv.sink_length, residual_k, residual_v, residual_k.shape[-2],
        *codes, n_blocks, splits, kv.counts if kv.counts is not None else residual_k,
        mask if mask is not None else residual_k, *mask_strides,
        lengths.to(torch.int32) if lengths is not None else residual_k,
        o_part, m_part, l_part,
        BN=block_n, G=group, BITS=bits, HAS_CODES=kv.key_codes is not None,
        HAS_MASK=mask is not None, HAS_LENGTHS=lengths is not None, HAS_COUNTS=kv.counts is not None,
        DOT_FP32=interpreting() or query.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages, **flags,
    )
    _decode_reduce[(batch * kv_heads,)](o_part, m_part, l_part, out, *out.stride()[:3], splits + 1, **flags)
    return out
