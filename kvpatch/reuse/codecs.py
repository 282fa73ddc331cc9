"""Chunk codecs: how a store keeps a chunk's K/V ("dense", "int8", "int4") and how it comes back.

The quantized codecs are KIVI's layout applied to one chunk, through the same group quantizer
as `quantizer/kivi` (`kvpatch.quant.groupwise`): keys per channel (a group is `GROUP_SIZE`
consecutive tokens of one channel; outliers live in fixed channels), values per token (a group
is `GROUP_SIZE` channels of one token, or all of them when `GROUP_SIZE` does not divide
head_dim). A chunk's last key group is padded by repeating its last token, so any chunk length
works. Error bound per element: half a quantization step of its group, `(max - min) / (2 *
(2**bits - 1))`, plus the float16 rounding of the group's scale and minimum.

`GROUP_SIZE` is part of the stored format (decoding derives the layout from it and the tensor
shapes), so it is a constant, not a setting.
"""

from __future__ import annotations

from typing import get_args

import torch

from ..quant.groupwise import dequantize_groups, quantize_groups
from ..stage_specs.store_memory import Codec
from .chunk import ChunkFormatError, StoredChunk

CODECS: tuple[str, ...] = get_args(Codec)
BITS: dict[str, int] = {"int8": 8, "int4": 4}
GROUP_SIZE = 32
_QUANT_NAMES = ("packed", "scale", "zero")


def encode_chunk(kv: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """The tensors a store keeps for `kv` ([layers, 2, kv_heads, tokens, head_dim]) under `codec`,
    on `kv`'s device (quantize on the GPU, then move the smaller codes)."""
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"chunk K/V must be [layers, 2, kv_heads, tokens, head_dim], got {list(kv.shape)}")
    if codec == "dense":
        return {"kv": kv.contiguous()}
    bits = _bits(codec)
    keys, values = kv[:, 0], kv[:, 1]  # [L, H, T, D]
    tokens, dim = keys.shape[-2], keys.shape[-1]
    pad = -tokens % GROUP_SIZE
    if pad:
        keys = torch.cat([keys, keys[..., -1:, :].expand(*keys.shape[:-2], pad, dim)], dim=-2)
    # keys: [L, H, D, groups, G] (groups run over tokens of one channel)
    key_groups = keys.transpose(-1, -2).reshape(*keys.shape[:2], dim, -1, GROUP_SIZE)
    value_groups = values.reshape(*values.shape[:3], -1, _value_group(dim))
    out: dict[str, torch.Tensor] = {}
    for role, grouped in (("key", key_groups), ("value", value_groups)):
        out.update({f"{role}.{name}": t for name, t in zip(_QUANT_NAMES, quantize_groups(grouped, bits))})
    return out


def dense_kv(chunk: StoredChunk, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The chunk's K/V as one `[layers, 2, kv_heads, tokens, head_dim]` tensor on `device`.

    Quantized codes are moved first and decoded there (less to copy). A dense chunk is one copy,
    `non_blocking` so that a pinned source overlaps with compute."""
    kv_shape(chunk)
    if chunk.codec == "dense":
        return chunk.tensors["kv"].to(device, non_blocking=True).to(dtype)
    bits = BITS[chunk.codec]
    t = {name: v.to(device, non_blocking=True) for name, v in chunk.tensors.items()}
    tokens = chunk.num_tokens
    key_groups = dequantize_groups(t["key.packed"], t["key.scale"], t["key.zero"], bits, GROUP_SIZE)
    keys = key_groups.flatten(-2)[..., :tokens].transpose(-1, -2)  # [L, H, T, D]
    dim = keys.shape[-1]
    values = dequantize_groups(t["value.packed"], t["value.scale"], t["value.zero"], bits, _value_group(dim))
    return torch.stack([keys, values.flatten(-2)], dim=1).to(dtype)


def kv_shape(chunk: StoredChunk) -> tuple[int, int, int, int]:
    """(layers, kv_heads, tokens, head_dim) of a chunk, after checking that its tensors are
    exactly what its codec stores, consistently shaped; ChunkFormatError otherwise (a chunk from
    a file or another process is checked before anything decodes it)."""
    where = f"chunk {chunk.prefix_hash[:16]}"
    if chunk.codec not in CODECS:
        raise ChunkFormatError(f"{where}: unknown codec {chunk.codec!r}; known: {', '.join(CODECS)}")
    names = {"kv"} if chunk.codec == "dense" else {f"{r}.{n}" for r in ("key", "value") for n in _QUANT_NAMES}
    if set(chunk.tensors) != names:
        raise ChunkFormatError(f"{where}: codec {chunk.codec} needs tensors {sorted(names)}, found {sorted(chunk.tensors)}")
    tokens = chunk.num_tokens
    if chunk.codec == "dense":
        kv = chunk.tensors["kv"]
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != tokens or not kv.is_floating_point():
            raise ChunkFormatError(f"{where}: kv must be floating [layers, 2, heads, {tokens}, dim], found "
                                   f"{kv.dtype} {list(kv.shape)}")
        return kv.shape[0], kv.shape[2], tokens, kv.shape[4]
    t = chunk.tensors
    layers, heads, dim = (t["key.scale"].shape[:3] if t["key.scale"].dim() == 5 else (-1, -1, -1))
    key_groups = -(-tokens // GROUP_SIZE)
    value_group = _value_group(dim) if dim > 0 else 1
    bits = BITS[chunk.codec]
    expected = {
        "key.scale": [layers, heads, dim, key_groups, 1],
        "key.packed": [layers, heads, dim, (key_groups * GROUP_SIZE * bits + 7) // 8],
        "value.scale": [layers, heads, tokens, dim // value_group, 1],
        "value.packed": [layers, heads, tokens, (dim * bits + 7) // 8],
    }
    expected["key.zero"], expected["value.zero"] = expected["key.scale"], expected["value.scale"]
    for name, shape in expected.items():
        want = torch.uint8 if name.endswith("packed") else torch.float16
        if list(t[name].shape) != shape or t[name].dtype != want:
            raise ChunkFormatError(f"{where}: {name} should be {want} {shape}, found {t[name].dtype} {list(t[name].shape)}")
    return layers, heads, tokens, dim


def _bits(codec: str) -> int:
    if codec not in BITS:
        raise ValueError(f"unknown chunk codec {codec!r}; known: {', '.join(CODECS)}")
    return BITS[codec]


def _value_group(dim: int) -> int:
    return GROUP_SIZE if dim % GROUP_SIZE == 0 else dim
