"""Asymmetric min/max integer quantization over groups of elements (the KIVI primitive).

`x` is quantized in groups along its last dimension: each group stores a scale and a zero point
(its minimum) in float16 and `bits`-bit integers, packed. The scale and zero point are rounded to
float16 BEFORE the integers are computed, so decoding reproduces exactly what encoding assumed
and the error stays within half a step (plus float16 rounding of the group's range).
"""

from __future__ import annotations

import torch

from .packing import pack_bits, unpack_bits

SCALE_DTYPE = torch.float16


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x[..., groups, group_size]` per group: (packed uint8, scale, zero) with
    scale and zero of shape `[..., groups, 1]`."""
    x = x.float()
    levels = (1 << bits) - 1
    low = x.amin(dim=-1, keepdim=True).to(SCALE_DTYPE)
    high = x.amax(dim=-1, keepdim=True)
    scale = ((high - low.float()) / levels).to(SCALE_DTYPE)
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.round((x - low.float()) / safe).clamp_(0, levels)
    return pack_bits(q.flatten(-2), bits), scale, low


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of `quantize_groups`: float32 `[..., groups, group_size]`."""
    groups = scale.shape[-2]
    q = unpack_bits(packed, bits, groups * group_size).reshape(*packed.shape[:-1], groups, group_size)
    return q.float() * scale.float() + zero.float()
