"""Triton building blocks every decode-attention loop shares: one online-softmax step over a
tile, and which keys each query row may see (bottom-right causal per sequence, padding mask)."""

from __future__ import annotations

import triton
import triton.language as tl

#: Running-max start: finite, so a fully masked tile gives exp2(-inf) = 0 and never inf - inf.
NEG = tl.constexpr(-1.0e30)


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
