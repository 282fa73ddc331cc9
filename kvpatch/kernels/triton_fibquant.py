"""The fused decode kernel's loop over FibQuant codes (`_fibquant_part`): attention in the codes'
rotated space, codebook rows gathered by index (a correctness path: docs/kernels.md)."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_softmax import _attend, _visible


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
