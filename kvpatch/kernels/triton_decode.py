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
def _softmax_step(s, v, valid, m_i, l_i, acc):
    """One online-softmax step (base 2: scores carry scale * log2(e)) over scores s [rows, N]
    and values v [N, D]."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
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
def _dense_part(q, m_i, l_i, acc, K, V, bh, T, start, limit, qi, MASK, sm_b, sm_t, b,
                HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    """Online softmax over a contiguous [B, Hkv, T, D] K/V pair whose first token is at `start`."""
    n = tl.arange(0, BN)
    d = tl.arange(0, D)
    base = bh.to(tl.int64) * T * D
    for t in range(tl.cdiv(T, BN)):
        tok = t * BN + n
        inside = tok < T
        k = tl.load(K + base + tok[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + base + tok[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
        valid = _visible(start + tok, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & inside[None, :]
        s = tl.dot(q, tl.trans(k).to(q.dtype))
        m_i, l_i, acc = _softmax_step(s, v.to(q.dtype), valid, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, NQ, bh, limit, qi, MASK, sm_b, sm_t, b,
                 HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    """The sinks (tokens [0, S)) and the residual (after the NQ quantized tokens)."""
    m_i, l_i, acc = _dense_part(q, m_i, l_i, acc, SK, SV, bh, S, 0, limit, qi, MASK, sm_b, sm_t, b,
                                HAS_MASK, D, BN)
    return _dense_part(q, m_i, l_i, acc, RK, RV, bh, R, S + NQ, limit, qi, MASK, sm_b, sm_t, b,
                       HAS_MASK, D, BN)


@triton.jit
def _kivi_part(q32, m_i, l_i, acc, KP, KS, KZ, VP, VS, VZ, bh, NBLK, tile_lo, tile_hi, start, limit, qi,
               MASK, sm_b, sm_t, b, HAS_MASK: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
               BITS: tl.constexpr, DOT: tl.constexpr):
    """Online softmax over KIVI blocks [tile_lo, tile_hi) (G tokens each), read packed.

    A key block shares one scale and zero per channel, so they fold into the query:
    q . (c * s + z) = (q * s) . c + q . z; the codes go into the dot as they are (exact in
    bf16). Values have per-token scales and are dequantized in the tile.
    """
    PB: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // PB
    NGV: tl.constexpr = D // G
    DB: tl.constexpr = D // PB
    bh64 = bh.to(tl.int64)
    kp = KP + bh64 * NBLK * (D * GB)
    ks, kz = KS + bh64 * NBLK * D, KZ + bh64 * NBLK * D
    vp = VP + bh64 * NBLK * (G * DB)
    vs, vz = VS + bh64 * NBLK * (G * NGV), VZ + bh64 * NBLK * (G * NGV)
    d = tl.arange(0, D)
    n = tl.arange(0, G)
    k_off = d[:, None] * GB + tl.arange(0, GB)[None, :]
    v_off = n[:, None] * DB + tl.arange(0, DB)[None, :]
    vs_off = n[:, None] * NGV + tl.arange(0, NGV)[None, :]
    for t in range(tile_lo, tile_hi):
        kc = tl.reshape(_unpack(tl.load(kp + t * (D * GB) + k_off), BITS), (D, G))
        k_scale = tl.load(ks + t * D + d).to(tl.float32)
        k_zero = tl.load(kz + t * D + d).to(tl.float32)
        s = tl.dot((q32 * k_scale[None, :]).to(DOT), kc.to(DOT)) + tl.sum(q32 * k_zero[None, :], 1)[:, None]

        vc = tl.reshape(_unpack(tl.load(vp + t * (G * DB) + v_off), BITS), (G, NGV, G))
        v_scale = tl.load(vs + t * (G * NGV) + vs_off).to(tl.float32)
        v_zero = tl.load(vz + t * (G * NGV) + vs_off).to(tl.float32)
        v = tl.reshape(vc.to(tl.float32) * v_scale[:, :, None] + v_zero[:, :, None], (G, D)).to(DOT)

        valid = _visible(start + t * G + n, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK)
        m_i, l_i, acc = _softmax_step(s, v, valid, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _decode_partial(
    Q, sq_b, sq_h, sq_t, qk_scale,
    SK, SV, S, RK, RV, R,
    KP, KS, KZ, VP, VS, VZ, NBLK, NSPLIT,
    MASK, sm_b, sm_t, LENGTHS,
    O_PART, M_PART, L_PART,
    HKV: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    HAS_CODES: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_FP32: tl.constexpr,
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
    q32 = q.to(tl.float32) * qk_scale
    if DOT_FP32:
        DOT: tl.constexpr = tl.float32
    else:
        DOT: tl.constexpr = Q.dtype.element_ty
    q = q32.to(DOT)
    NQ = NBLK * G
    if HAS_LENGTHS:
        seq_len = tl.load(LENGTHS + b)
    else:
        seq_len = S + NQ + R
    limit = seq_len - TQ + 1 + qi
    m_i = tl.full([BM], NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if HAS_CODES:
        if split < NSPLIT:
            per_split = tl.cdiv(NBLK, NSPLIT)
            lo = split * per_split
            # blocks past this sequence's length are never read
            hi = tl.minimum(tl.minimum(lo + per_split, NBLK), tl.cdiv(tl.maximum(seq_len - S, 0), G))
            m_i, l_i, acc = _kivi_part(q32, m_i, l_i, acc, KP, KS, KZ, VP, VS, VZ, bh, NBLK, lo, hi, S, limit,
                                       qi, MASK, sm_b, sm_t, b, HAS_MASK, D, G, BITS, DOT)
        else:
            m_i, l_i, acc = _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, NQ, bh, limit, qi,
                                         MASK, sm_b, sm_t, b, HAS_MASK, D, BN)
    else:
        m_i, l_i, acc = _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, NQ, bh, limit, qi,
                                     MASK, sm_b, sm_t, b, HAS_MASK, D, BN)
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
        group = layout[1]
        if group & (group - 1) or group < 16 or dim % group:
            return f"KIVI group_size {group} (the kernel needs a power of two >= 16 dividing head_dim)"
    return None


def _num_splits(blocks: int, programs: int, device: torch.device) -> int:
    """Enough splits that the grid covers the device ~8 times over (best of 4x / 8x on an H100,
    tools/bench_kernels.py sweep), at least one KIVI block each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(blocks, triton.cdiv(8 * sms, programs)))


def decode_attention(
    query: torch.Tensor,
    kv: PackedKV,
    scaling: float,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of query `[B, Hq, Tq, D]` over every token of `kv`; returns `[B, Hq, Tq, D]`.

    `mask` is boolean `[B or 1, 1, Tq or 1, >= Tk]` (True = attend); `lengths` (int `[B]`) limits
    sequence b to its first `lengths[b]` tokens, the last query seeing all of them.
    `num_splits`, `block_n` (tokens per tile of the dense parts; a KIVI tile is one block),
    `num_warps`, `num_stages` are tuning knobs
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
        splits = num_splits or _num_splits(n_blocks, batch * kv_heads, query.device)
    else:
        bits, group, n_blocks, splits = 8, 16, 0, 0
        codes = [residual_k] * 6
    if mask is not None:
        mask = mask[:, 0, :, : kv.num_tokens]
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask = mask.view(torch.uint8)
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
        *codes, n_blocks, splits,
        mask if mask is not None else residual_k, *mask_strides,
        lengths.to(torch.int32) if lengths is not None else residual_k,
        o_part, m_part, l_part,
        BN=block_n, G=group, BITS=bits, HAS_CODES=kv.key_codes is not None,
        HAS_MASK=mask is not None, HAS_LENGTHS=lengths is not None,
        DOT_FP32=interpreting() or query.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages, **flags,
    )
    _decode_reduce[(batch * kv_heads,)](o_part, m_part, l_part, out, *out.stride()[:3], splits + 1, **flags)
    return out
