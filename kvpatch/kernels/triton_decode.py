"""Fused decode attention over a cache layer's stored parts: full-precision sinks and residual,
and KIVI codes read packed (no dequantized copy of K/V ever reaches device memory).

Decode attention is memory-bound, so the kernel's job is to read each stored byte once:
- split-K (flash-decoding): program (split, batch x kv head) runs an online softmax over one
  range of the quantized tokens; one extra split per (batch, kv head) covers the small dense
  parts (sinks + residual). A second kernel merges the splits' partial (max, sum, output).
- GQA: the rows of a program are all the query heads of one kv head times the Tq queries, so one
  read of K/V serves the whole group (rows padded to 16 for the tensor-core dot).
- KIVI codes are read in `quantizer/kivi`'s packed layout (unchanged) and never unpacked into
  natural order: each bit field of a byte tile is a dot operand of its own (keys: one QK dot per
  field = tokens j*per_byte + f; values: one accumulator per field = channels c*per_byte + f),
  see `_kivi_part`. On the GPU the codes are dequantized in fp16 by inline PTX (`_field`).
- FibQuant codes (one byte per block of coordinates + a norm per token) are attended in the codes'
  rotated space: q and the dense parts are rotated once per call, each tile gathers codebook rows
  by index (`_fibquant_part`), and the merged output is rotated back.
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

from .packed import PackedKV, fibquant_layout, kivi_layout
from .triton_support import interpreting

LOG2E = 1.4426950408889634
#: Running-max start: finite, so a fully masked tile gives exp2(-inf) = 0 and never inf - inf.
NEG = tl.constexpr(-1.0e30)
#: Decode only: more query rows per kv head than this go to SDPA (prefill).
MAX_QUERY_ROWS = 64


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
def _field(b, scale, zero, F: tl.constexpr, BITS: tl.constexpr, FAST_CVT: tl.constexpr, DT: tl.constexpr):
    """Bit field F of packed codes `b` (uint8) dequantized: `code * scale + zero`, as DT.

    FAST_CVT (GPU only, DT fp16): inline PTX per 4 bytes: one AND keeps the field in place, two
    PRMT put each byte under the fp16 exponent of 2^(10 - F*BITS) (so the field's lowest bit has
    weight 1: the half is exactly magic + code), one HSUB2 removes the magic (exact), one HFMA2
    applies the fp16 scale/zero: 7 instructions per 4 codes, no I2F, no fp32. Otherwise: shift,
    mask, fp32 `code * scale + zero` (the torch decode's formula), rounded to DT."""
    P: tl.constexpr = F * BITS
    if FAST_CVT:
        MASK: tl.constexpr = ((1 << BITS) - 1) << P
        HI: tl.constexpr = (25 - P) << 2  # high byte of fp16 2^(10 - P)
        out = tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t, h0, h1, m;
            and.b32 t, $2, {MASK * 0x01010101};
            prmt.b32 h0, t, {HI * 0x01010101}, 0x4140;
            prmt.b32 h1, t, {HI * 0x01010101}, 0x4342;
            mov.b32 m, {(HI << 8) * 0x00010001};
            sub.f16x2 h0, h0, m;
            sub.f16x2 h1, h1, m;
            fma.rn.f16x2 $0, h0, $3, $5;
            fma.rn.f16x2 $1, h1, $4, $6;
            }}""",
            constraints="=r,=r,r,r,r,r,r",
            args=[b, scale, zero], dtype=tl.float16, is_pure=False, pack=4)
    else:
        code = ((b >> P) & ((1 << BITS) - 1)).to(tl.float32)
        out = (code * scale.to(tl.float32) + zero.to(tl.float32)).to(DT)
    return out


@triton.jit
def _spread(x, R: tl.constexpr):
    """[M, N] -> [M, N * R], each column repeated R times (a per-group value over its columns)."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[:, :, None], (M, N, R)), (M, N * R))


@triton.jit
def _kivi_part(q, m_i, l_i, acc, KP, KS, KZ, VP, VS, VZ, bh, NBLK_CAP, NBLK, tile_lo, tile_hi, start, limit,
               qi, MASK, sm_b, sm_t, b, HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
               G: tl.constexpr, BITS: tl.constexpr, FAST_CVT: tl.constexpr, SCORE_JOIN: tl.constexpr):
    """Online softmax over tiles [tile_lo, tile_hi) of BN tokens of KIVI codes, read packed: the
    first NBLK of buffers holding NBLK_CAP blocks per (batch, kv head).

    No unpacking shuffles: the codes stay in their packed order and each bit field is its own
    operand. Keys pack tokens along a byte (byte j of a block's channel holds tokens j*PB + f in
    field f), so field f of the [D, BN/PB] byte tile is the key tile of tokens {j*PB + f}: one
    QK dot per field. Values pack channels along a byte, so field fc of a [BN/PB, D/PB] byte tile
    is channels {c*PB + fc}: the PV side loads, per key field f, the value rows of exactly those
    tokens (row stride PB, pure addressing) and keeps PB accumulators of D/PB channels each, split
    from `acc` on entry and interleaved back on exit (once per call).

    SCORE_JOIN (v5): the PB small score tiles [BM, BN/PB] are interleaved (tl.join) into one
    [BM, BN] tile in natural token order right after the QK dots, so the softmax runs once per
    tile (one max and one sum across warps instead of PB each) and the PV side is PB dots with
    K = BN over the tile's contiguous value rows (instead of PB * PB dots with K = BN/PB over rows
    of stride PB): fewer, larger dots and fewer shared-memory round trips (barriers)."""
    PB: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // PB  # bytes per channel per block (keys) = bytes per group (values)
    NG: tl.constexpr = BN // G
    NB: tl.constexpr = BN // PB  # tokens per field per tile
    NGV: tl.constexpr = D // G
    DB: tl.constexpr = D // PB
    BM: tl.constexpr = q.shape[0]
    if FAST_CVT:
        DT: tl.constexpr = tl.float16
    else:
        DT: tl.constexpr = q.dtype
    q = q.to(DT)
    NQ = NBLK * G
    bh64 = bh.to(tl.int64)
    kp, ks = KP + bh64 * NBLK_CAP * D * GB, bh64 * NBLK_CAP * D
    vp, vs = VP + bh64 * NBLK_CAP * G * DB, bh64 * NBLK_CAP * G * NGV
    d = tl.arange(0, D)
    jj = tl.arange(0, NB)
    r = tl.arange(0, NB)
    c = tl.arange(0, DB)
    # tile-relative offsets, computed once
    k_off = (jj // GB)[None, :] * (D * GB) + d[:, None] * GB + (jj % GB)[None, :]
    g = tl.arange(0, NG)
    gv = tl.arange(0, NGV)
    ks_off = g[None, :] * D + d[:, None]
    v_off = r[:, None] * (PB * DB) + c[None, :]
    vs_off = r[:, None] * (PB * NGV) + gv[None, :]
    n = tl.arange(0, BN)
    vt_off = n[:, None] * DB + c[None, :]
    vts_off = n[:, None] * NGV + gv[None, :]
    if PB == 1:
        a0 = acc
    elif PB == 2:
        a0, a1 = tl.split(tl.reshape(acc, (BM, DB, 2)))
    else:
        ev, od = tl.split(tl.reshape(acc, (BM, DB, 2, 2)))
        a0, a2 = tl.split(ev)
        a1, a3 = tl.split(od)
    for t in range(tile_lo, tile_hi):
        has_blk = (t * NG + jj // GB) < NBLK
        kb = tl.load(kp + t * (NG * D * GB) + k_off, mask=has_blk[None, :], other=0)
        # per (channel, block): loaded once, broadcast over the block's byte columns in registers
        has_g = (t * NG + g) < NBLK
        k_scale = _spread(tl.load(KS + ks + t * (NG * D) + ks_off, mask=has_g[None, :], other=0.0), GB)
        k_zero = _spread(tl.load(KZ + ks + t * (NG * D) + ks_off, mask=has_g[None, :], other=0.0), GB)
        if SCORE_JOIN:
            s0 = tl.dot(q, _field(kb, k_scale, k_zero, 0, BITS, FAST_CVT, DT))
            if PB == 1:
                sj = s0
            elif PB == 2:
                s1 = tl.dot(q, _field(kb, k_scale, k_zero, 1, BITS, FAST_CVT, DT))
                sj = tl.reshape(tl.join(s0, s1), (BM, BN))
            else:
                s1 = tl.dot(q, _field(kb, k_scale, k_zero, 1, BITS, FAST_CVT, DT))
                s2 = tl.dot(q, _field(kb, k_scale, k_zero, 2, BITS, FAST_CVT, DT))
                s3 = tl.dot(q, _field(kb, k_scale, k_zero, 3, BITS, FAST_CVT, DT))
                sj = tl.reshape(tl.join(tl.join(s0, s2), tl.join(s1, s3)), (BM, BN))
            tok = t * BN + n
            sj = tl.where(_visible(start + tok, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & (tok < NQ)[None, :], sj,
                          float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sj, 1))
            alpha = tl.exp2(m_i - m_new)
            m_i = m_new
            p = tl.exp2(sj - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(DT)
            has_tok = (tok < NQ)[:, None]
            vb = tl.load(vp + t * (BN * DB) + vt_off, mask=has_tok, other=0)
            srow = vs + t * (BN * NGV) + vts_off
            v_scale = _spread(tl.load(VS + srow, mask=has_tok, other=0.0), GB)
            v_zero = _spread(tl.load(VZ + srow, mask=has_tok, other=0.0), GB)
            a0 = a0 * alpha[:, None] + tl.dot(p, _field(vb, v_scale, v_zero, 0, BITS, FAST_CVT, DT))
            if PB > 1:
                a1 = a1 * alpha[:, None] + tl.dot(p, _field(vb, v_scale, v_zero, 1, BITS, FAST_CVT, DT))
            if PB > 2:
                a2 = a2 * alpha[:, None] + tl.dot(p, _field(vb, v_scale, v_zero, 2, BITS, FAST_CVT, DT))
                a3 = a3 * alpha[:, None] + tl.dot(p, _field(vb, v_scale, v_zero, 3, BITS, FAST_CVT, DT))
        else:
            tok0 = t * BN + r * PB
            s0 = tl.dot(q, _field(kb, k_scale, k_zero, 0, BITS, FAST_CVT, DT))
            s0 = tl.where(_visible(start + tok0, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & (tok0 < NQ)[None, :], s0, float("-inf"))
            smax = s0
            if PB > 1:
                s1 = tl.dot(q, _field(kb, k_scale, k_zero, 1, BITS, FAST_CVT, DT))
                s1 = tl.where(_visible(start + tok0 + 1, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & (tok0 + 1 < NQ)[None, :], s1, float("-inf"))
                smax = tl.maximum(smax, s1)
            if PB > 2:
                s2 = tl.dot(q, _field(kb, k_scale, k_zero, 2, BITS, FAST_CVT, DT))
                s2 = tl.where(_visible(start + tok0 + 2, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & (tok0 + 2 < NQ)[None, :], s2, float("-inf"))
                smax = tl.maximum(smax, s2)
                s3 = tl.dot(q, _field(kb, k_scale, k_zero, 3, BITS, FAST_CVT, DT))
                s3 = tl.where(_visible(start + tok0 + 3, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & (tok0 + 3 < NQ)[None, :], s3, float("-inf"))
                smax = tl.maximum(smax, s3)
            # one cross-warp max (and below one sum) per tile: fields are combined elementwise first
            m_new = tl.maximum(m_i, tl.max(smax, 1))
            alpha = tl.exp2(m_i - m_new)
            m_i = m_new
            a0 = a0 * alpha[:, None]
            if PB > 1:
                a1 = a1 * alpha[:, None]
            if PB > 2:
                a2 = a2 * alpha[:, None]
                a3 = a3 * alpha[:, None]
            l_i = l_i * alpha
            for f in tl.static_range(PB):
                if f == 0:
                    p = tl.exp2(s0 - m_new[:, None])
                elif f == 1:
                    p = tl.exp2(s1 - m_new[:, None])
                elif f == 2:
                    p = tl.exp2(s2 - m_new[:, None])
                else:
                    p = tl.exp2(s3 - m_new[:, None])
                if f == 0:
                    psum = p
                else:
                    psum += p
                p = p.to(DT)
                has_tok = (tok0 + f < NQ)[:, None]
                vrow = vp + (t * BN + f) * DB + v_off
                srow = vs + (t * BN + f) * NGV + vs_off
                vb = tl.load(vrow, mask=has_tok, other=0)
                v_scale = _spread(tl.load(VS + srow, mask=has_tok, other=0.0), GB)
                v_zero = _spread(tl.load(VZ + srow, mask=has_tok, other=0.0), GB)
                a0 += tl.dot(p, _field(vb, v_scale, v_zero, 0, BITS, FAST_CVT, DT))
                if PB > 1:
                    a1 += tl.dot(p, _field(vb, v_scale, v_zero, 1, BITS, FAST_CVT, DT))
                if PB > 2:
                    a2 += tl.dot(p, _field(vb, v_scale, v_zero, 2, BITS, FAST_CVT, DT))
                    a3 += tl.dot(p, _field(vb, v_scale, v_zero, 3, BITS, FAST_CVT, DT))
            l_i += tl.sum(psum, 1)
    if PB == 1:
        acc = a0
    elif PB == 2:
        acc = tl.reshape(tl.join(a0, a1), (BM, D))
    else:
        acc = tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), (BM, D))
    return m_i, l_i, acc


@triton.jit
def _fibquant_part(q, m_i, l_i, acc, KI, KN, KC, VI, VN, VC, bh, T_CAP, NQ, tile_lo, tile_hi, start, limit, qi,
                   MASK, sm_b, sm_t, b, HAS_MASK: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr):
    """Online softmax over tiles [tile_lo, tile_hi) of BN tokens of FibQuant codes, in the rotated
    space (the caller rotates q and the dense parts, and rotates the output back): a token is its
    norm times the codebook rows its D/BD one-byte indices name, gathered from the small (cache-
    resident) codebook; the first NQ of T_CAP tokens per (batch, kv head) are valid."""
    NI: tl.constexpr = D // BD
    n = tl.arange(0, BN)
    j = tl.arange(0, NI)
    e = tl.arange(0, BD)
    base = bh.to(tl.int64) * T_CAP
    for t in range(tile_lo, tile_hi):
        tok = t * BN + n
        has_tok = tok < NQ
        row = base + tok
        k_index = tl.load(KI + row[:, None] * NI + j[None, :], mask=has_tok[:, None], other=0).to(tl.int32)
        v_index = tl.load(VI + row[:, None] * NI + j[None, :], mask=has_tok[:, None], other=0).to(tl.int32)
        k_norm = tl.load(KN + row, mask=has_tok, other=0.0).to(tl.float32)
        v_norm = tl.load(VN + row, mask=has_tok, other=0.0).to(tl.float32)
        k = tl.reshape(tl.load(KC + k_index[:, :, None] * BD + e[None, None, :]), (BN, D)) * k_norm[:, None]
        v = tl.reshape(tl.load(VC + v_index[:, :, None] * BD + e[None, None, :]), (BN, D)) * v_norm[:, None]
        valid = _visible(start + tok, limit, qi, MASK, sm_b, sm_t, b, HAS_MASK) & has_tok[None, :]
        m_i, l_i, acc = _attend(q, tl.trans(k), v, valid, m_i, l_i, acc)
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
    else:
        m_i, l_i, acc = _dense_parts(q, m_i, l_i, acc, SK, SV, S, RK, RV, R, r_first, r_count, NQ, bh,
                                     limit, qi, MASK, sm_b, sm_t, b, HAS_MASK, D, DENSE_BN)
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
        fibquant = fibquant_layout(kv.quantizer)
        if fibquant is not None:
            block_dim, code_bits = fibquant
            if code_bits != 8 or block_dim & (block_dim - 1) or dim % block_dim:
                return (f"FibQuant code_bits {code_bits} / block_dim {block_dim} (fused: 8-bit indices, a "
                        "power-of-two block dividing head_dim)")
            return None
        layout = kivi_layout(kv.quantizer)
        if layout is None:
            return f"codes of quantizer {getattr(kv.quantizer, 'name', kv.quantizer)!r} (KIVI and FibQuant are fused)"
        bits, group = layout
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


def _num_splits(tiles: int, programs: int, device: torch.device, policy: str = "cover8") -> int:
    """Splits per (batch, kv head), at least one tile each. `policy`:
    - "coverN": enough splits that the code programs cover the device N programs per SM over
      (8 was the best for v1, results/kernels-h100-v1-sweep.json; 4 for v4/v5);
    - "waveN": the most splits for which the code programs fit in one wave of N programs per SM
      (no half-empty last wave; the one short dense program per (batch, kv head) is not counted:
      counting it cost B=32 half its splits, results/kernels-h100-splits.json)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    kind, per_sm = policy.rstrip("0123456789"), int(policy[len(policy.rstrip("0123456789")):] or 0)
    if kind not in ("cover", "wave") or per_sm < 1:
        raise ValueError(f"split_policy {policy!r}: expected 'coverN' or 'waveN' with N >= 1")
    if kind == "wave":
        return max(1, min(tiles, per_sm * sms // programs))
    return max(1, min(tiles, triton.cdiv(per_sm * sms, programs)))


def decode_attention(
    query: torch.Tensor,
    kv: PackedKV,
    scaling: float,
    mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    fast_cvt: bool | None = None,
    score_join: bool | None = None,
    maxnreg: int | None = None,
    dense_block_n: int = 64,
    split_policy: str | None = None,
) -> torch.Tensor:
    """Attention of query `[B, Hq, Tq, D]` over every token of `kv`; returns `[B, Hq, Tq, D]`.

    `mask` is boolean `[B or 1, 1, Tq or 1, >= Tk]` (True = attend); `lengths` (int `[B]`) limits
    sequence b to its first `lengths[b]` tokens, the last query seeing all of them.
    `num_splits`, `block_n` (tokens per tile), `num_warps`, `num_stages` are tuning knobs
    (tools/bench_kernels.py sweeps them); the defaults are the best measured on an H100.
    `block_n` defaults to 128 with `fast_cvt`, else 64. `fast_cvt` (default: on the GPU for bf16/fp16 queries) dequantizes the codes in fp16 with
    inline PTX (magic-number conversion, fp16 dots); off, in fp32 with the query's dot dtype.
    `score_join` (default off: slower in the H100 sweep for int4 and int2) interleaves the per-field score tiles into one
    natural-order tile (one softmax and PB large PV dots per tile, see `_kivi_part`).
    `maxnreg` caps registers per thread (Triton's launch option; default 128 at 4 warps = 4
    programs of 4 warps per H100 SM, the sweep's best despite a few spills; 0 = no cap). `dense_block_n` is the tile of the small bf16
    sinks/residual part (it sets the kernel's register and shared-memory peak if larger).
    """
    reason = unsupported_reason(query, kv, mask)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    batch, q_heads, q_len, dim = query.shape
    kv_heads = kv.keys.shape[1]
    if fast_cvt is None:
        fast_cvt = not interpreting() and query.dtype != torch.float32
    if block_n is None:
        # fp16 dequant: 128-token tiles (4.1 SASS instr per int4 element at 4 warps, no spills);
        # the fp32 path spills at 128 (tools/kernel_sass.py)
        block_n = 128 if fast_cvt else 64
    if num_stages is None:
        num_stages = 2 if fast_cvt else 3  # the H100 sweeps' best (v4 / v1)
    if maxnreg is None:
        # fp16 KIVI loops at 4 warps: 4 programs per SM (results/kernels-h100-v5.json: better than
        # 168 or no cap at B=1 and B=8); the fp32 path, FibQuant and dense-only caches are uncapped
        maxnreg = 128 if num_warps == 4 and fast_cvt and kivi_layout(kv.quantizer) is not None else 0
    launch = {"maxnreg": maxnreg} if maxnreg and not interpreting() else {}
    gqa = q_heads // kv_heads
    rows = gqa * q_len
    block_m = max(16, triton.next_power_of_2(rows))
    fibquant = fibquant_layout(kv.quantizer) if kv.key_codes is not None else None
    rotate: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # noqa: E731
    if fibquant is not None:  # everything in the codes' rotated space: q.k and sum(p v) are invariant
        matrix = _rotation_matrix(kv.quantizer.rotation(dim, query.device), dim, query.device)
        rotate = lambda t: (t.float() @ matrix).to(t.dtype)  # noqa: E731
        query = rotate(query)
    residual_k, residual_v = rotate(kv.keys).contiguous(), rotate(kv.values).contiguous()
    sink_k = rotate(kv.sink_keys).contiguous() if kv.sink_keys is not None else residual_k
    sink_v = rotate(kv.sink_values).contiguous() if kv.sink_values is not None else residual_v
    if fibquant is not None:
        block_dim, bits = fibquant
        kt, vt = kv.key_codes.tensors, kv.value_codes.tensors
        codes = [kt["index"], kt["norm"], kv.quantizer.codebook("key", dim, query.device),
                 vt["index"], vt["norm"], kv.quantizer.codebook("value", dim, query.device)]
        codes = [t.contiguous() for t in codes]
        n_blocks, group = kv.key_codes.num_blocks, 1
        block_n = 64
        splits = num_splits or _num_splits(triton.cdiv(n_blocks, block_n), batch * kv_heads, query.device,
                                           split_policy or "cover8")
    elif kv.key_codes is not None:
        block_dim = 1
        bits, group = kivi_layout(kv.quantizer)
        if score_join is None:
            score_join = False  # the H100 sweep (results/kernels-h100-v5.json): per-field wins for int4 and int2
        kt, vt = kv.key_codes.tensors, kv.value_codes.tensors
        codes = [kt["packed"], kt["scale"], kt["zero"], vt["packed"], vt["scale"], vt["zero"]]
        codes = [t.contiguous() for t in codes]
        n_blocks = kv.key_codes.num_blocks
        block_n = max(block_n, group)
        splits = num_splits or _num_splits(triton.cdiv(n_blocks * group, block_n), batch * kv_heads, query.device,
                                           split_policy or ("wave4" if fast_cvt else "cover8"))
    else:
        bits, group, n_blocks, splits, block_dim = 8, block_n, 0, 0, 1
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
        BN=block_n, G=group, BITS=bits, HAS_CODES=kv.key_codes is not None,
        HAS_MASK=mask is not None, HAS_LENGTHS=lengths is not None, HAS_COUNTS=kv.counts is not None,
        DOT_FP32=interpreting() or query.dtype == torch.float32, FAST_CVT=fast_cvt and fibquant is None,
        FIBQUANT=fibquant is not None, BD=block_dim,
        SCORE_JOIN=bool(score_join), DENSE_BN=min(dense_block_n, block_n) if kv.key_codes is not None else block_n,
        num_warps=num_warps, num_stages=num_stages, **launch, **flags,
    )
    _decode_reduce[(batch * kv_heads,)](o_part, m_part, l_part, out, *out.stride()[:3], splits + 1, **flags)
    if fibquant is not None:
        return (out @ matrix.T).to(query.dtype)
    return out
