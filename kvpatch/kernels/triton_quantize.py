"""KIVI quantize-and-pack in one Triton kernel: the codes `quantizer/kivi` would produce, bitwise.

The torch encode is ~30 small kernels (min, max, scale, divide, round, shift, sum per role); this
is one launch per role. Both roles are groups of G elements with one float16 scale and zero:
keys group G tokens of one channel, values G channels of one token. Group r of a (batch, head)
starts at `(r // INNER) * s_outer + (r % INNER) * s_inner` and steps by `s_elem`; its codes go to
bytes `[r * G / per_byte, ...)` and its scale to index r, which is exactly the layout of
`quantize_groups` (keys `[B, H, blocks, D * G / per_byte]`, values `[B, H, T, D / per_byte]`).
Bitwise equality with the torch path needs IEEE division (`div_rn`) and round-half-to-even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.codes import Codes
from ..quant.groupwise import SCALE_DTYPE

#: Adding then subtracting 1.5 * 2**23 rounds a float32 |y| < 2**22 to an integer, ties to even
#: (torch.round's rule); libdevice.rint would do it on a GPU but not in Triton's interpreter.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _kivi_encode(
    X, sx_b, sx_h, s_outer, s_inner, s_elem, P, SCALE, ZERO, GROUPS, ENABLED,
    HEADS: tl.constexpr, INNER: tl.constexpr, BR: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
):
    PB: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // PB
    LEVELS: tl.constexpr = (1 << BITS) - 1
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    has = r < GROUPS
    if HAS_ENABLED:  # a device flag: off, nothing is read or written (CUDA-graph friendly skip)
        has = has & (tl.load(ENABLED + tl.zeros([BR], tl.int32)) != 0)
    j = tl.arange(0, GB)
    f = tl.arange(0, PB)
    elem = j[None, :, None] * PB + f[None, None, :]
    row = (r // INNER).to(tl.int64) * s_outer + (r % INNER) * s_inner
    x = tl.load(X + b.to(tl.int64) * sx_b + h * sx_h + row[:, None, None] + elem * s_elem,
                mask=has[:, None, None], other=0.0).to(tl.float32)
    low = tl.min(tl.min(x, 2), 1).to(tl.float16)
    high = tl.max(tl.max(x, 2), 1)
    scale = tl.math.div_rn(high - low.to(tl.float32), tl.full([BR], LEVELS, tl.float32)).to(tl.float16)
    safe = tl.where(scale.to(tl.float32) > 0, scale.to(tl.float32), 1.0)
    y = tl.math.div_rn(x - low.to(tl.float32)[:, None, None], tl.broadcast_to(safe[:, None, None], x.shape))
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    q = tl.minimum(tl.maximum(y, 0.0), LEVELS).to(tl.int32)
    packed = tl.sum(q << (f * BITS)[None, None, :], 2).to(tl.uint8)
    out = bh.to(tl.int64) * GROUPS + r
    tl.store(P + out[:, None] * GB + j[None, :], packed, mask=has[:, None])
    tl.store(SCALE + out, scale, mask=has)
    tl.store(ZERO + out, low, mask=has)


def kivi_encode(x: torch.Tensor, role: str, bits: int, group: int, enabled: torch.Tensor | None = None) -> Codes:
    """`quantizer/kivi`'s `encode(x, role)` in one launch: x `[B, H, T, D]`, T a multiple of
    `group` for keys, D a multiple of it for values; returns the same `Codes`, bitwise.
    `enabled` (a device scalar): when 0 the kernel reads and writes nothing and the returned
    tensors are uninitialised (the static layer's every-step flush, decided on the device)."""
    batch, heads, tokens, dim = x.shape
    per_byte = 8 // bits
    s_b, s_h, s_t, s_d = x.stride()
    if role == "key":
        blocks = tokens // group
        inner, s_outer, s_inner, s_elem = dim, group * s_t, s_d, s_t
        groups = blocks * dim
        shapes = ((blocks, dim * group // per_byte), (blocks, dim, 1))
    else:
        inner, s_outer, s_inner, s_elem = dim // group, s_t, group * s_d, s_d
        groups = tokens * inner
        shapes = ((tokens, dim // per_byte), (tokens, inner, 1))
    packed = torch.empty(batch, heads, *shapes[0], device=x.device, dtype=torch.uint8)
    scale = torch.empty(batch, heads, *shapes[1], device=x.device, dtype=SCALE_DTYPE)
    zero = torch.empty_like(scale)
    rows = max(1, min(4096 // group, triton.next_power_of_2(groups)))
    if groups:
        _kivi_encode[(triton.cdiv(groups, rows), batch * heads)](
            x, s_b, s_h, s_outer, s_inner, s_elem, packed, scale, zero, groups,
            enabled if enabled is not None else scale,
            HEADS=heads, INNER=inner, BR=rows, G=group, BITS=bits, HAS_ENABLED=enabled is not None,
        )
    return Codes({"packed": packed, "scale": scale, "zero": zero}, group if role == "key" else 1, dim)
