"""`PackedKV`: one cache layer's K/V as stored (sinks, quantizer codes, residual), not decoded.

`QuantizedLayer.update` hands this to the attention function in decode instead of decoded
tensors, so a fused kernel can read the packed codes directly (4-bit codes are a quarter of the
bytes of bf16). Every other kernel calls `dense()`, which is exactly what the layer used to return.
Tokens are ordered sinks, codes, residual, as `dense()` concatenates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..quant.codes import Codes

#: decode(codes, role, dtype) -> [batch, heads, tokens, head_dim], the quantizer's (maybe compiled) decode.
Decoder = Callable[[Codes, str, torch.dtype], torch.Tensor]


@dataclass
class PackedKV:
    keys: torch.Tensor
    values: torch.Tensor
    sink_keys: torch.Tensor | None = None
    sink_values: torch.Tensor | None = None
    key_codes: Codes | None = None
    value_codes: Codes | None = None
    #: The stage that made the codes (fused kernels read its parameters, e.g. KIVI bits/group).
    quantizer: Any = None
    decode: Decoder | None = None
    #: The cache layer the parts belong to, so a kernel can tell it to encode on the GPU too.
    layer: Any = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """`[batch, kv_heads, tokens, head_dim]` of the K that `dense()` returns."""
        batch, heads, _, dim = self.keys.shape
        return batch, heads, self.num_tokens, dim

    @property
    def sink_length(self) -> int:
        return self.sink_keys.shape[-2] if self.sink_keys is not None else 0

    @property
    def quantized_tokens(self) -> int:
        return self.key_codes.num_tokens if self.key_codes is not None else 0

    @property
    def num_tokens(self) -> int:
        return self.sink_length + self.quantized_tokens + self.keys.shape[-2]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens in order (sinks, decoded codes, residual) in the residual's dtype."""
        keys, values = [self.keys], [self.values]
        if self.key_codes is not None:
            if self.decode is None:
                raise ValueError("PackedKV with codes needs a decode function")
            keys.insert(0, self.decode(self.key_codes, "key", self.keys.dtype))
            values.insert(0, self.decode(self.value_codes, "value", self.keys.dtype))
        if self.sink_keys is not None:
            keys.insert(0, self.sink_keys)
            values.insert(0, self.sink_values)
        if len(keys) == 1:
            return self.keys, self.values
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def kivi_layout(quantizer: Any) -> tuple[int, int] | None:
    """(bits, group_size) if `quantizer` is the KIVI stage, else None (read by duck typing:
    kernels never import stages)."""
    if getattr(quantizer, "kind", None) != "quantizer" or getattr(quantizer, "name", None) != "kivi":
        return None
    return int(quantizer.params.bits), int(quantizer.params.group_size)
