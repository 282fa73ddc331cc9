"""The fused decode kernel's loop over KIVI codes (`_kivi_part`), read in `quantizer/kivi`'s
packed layout and never unpacked into natural order: each bit field of a byte tile is a dot
operand of its own. On the GPU the codes become fp16 by inline PTX (`_field`). How this loop was
designed and measured: docs/kernels.md (v4, v5)."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_softmax import _visible


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
