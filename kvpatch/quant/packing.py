"""Bit packing of small unsigned integers into uint8 along the last dimension.

Widths that divide 8 (1, 2, 4, 8) pack several values per byte with shifts; any other width up
to 16 (FibQuant's codebook indices, e.g. 12 bits) goes through a bit-plane layout. Both are
plain torch ops, so they run on CPU and GPU and trace under torch.compile.
"""

from __future__ import annotations

import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take."""
    return (count * bits + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dim into uint8 `[..., packed_size(n, bits)]`."""
    _check_bits(bits)
    count = values.shape[-1]
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = _pad_last(values.to(torch.int32), -count % per_byte)
        grouped = padded.reshape(*padded.shape[:-1], -1, per_byte)
        shifts = torch.arange(per_byte, device=values.device, dtype=torch.int32) * bits
        return (grouped << shifts).sum(-1).to(torch.uint8)
    planes = (values.to(torch.int32).unsqueeze(-1) >> torch.arange(bits, device=values.device, dtype=torch.int32)) & 1
    flat = planes.reshape(*values.shape[:-1], count * bits)
    flat = _pad_last(flat, -flat.shape[-1] % 8)
    grouped = flat.reshape(*flat.shape[:-1], -1, 8)
    return (grouped << torch.arange(8, device=values.device, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` values along the last dim, as int32."""
    _check_bits(bits)
    as_int = packed.to(torch.int32)
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
        values = (as_int.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return values.reshape(*packed.shape[:-1], -1)[..., :count]
    planes = (as_int.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    flat = planes.reshape(*packed.shape[:-1], -1)[..., : count * bits]
    grouped = flat.reshape(*packed.shape[:-1], count, bits)
    return (grouped << torch.arange(bits, device=packed.device, dtype=torch.int32)).sum(-1)


def _pad_last(x: torch.Tensor, amount: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, amount)) if amount else x


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be between 1 and 16, got {bits}")
