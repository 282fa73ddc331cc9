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
from ..quant.kernel_layouts import KernelLayout

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
    #: The stage that made the codes (a `QuantizerStage`: fused kernels read the layout it
    #: declares, `kernel_layout()`).
    quantizer: Any = None
    decode: Decoder | None = None
    #: The cache layer the parts belong to, so a kernel can tell it to encode on the GPU too.
    layer: Any = None
    #: Static layers (fixed-capacity buffers, CUDA-graph capturable): device int64 `[3]` =
    #: (valid code blocks, first residual slot, residual tokens); `keys`/`values` are then a ring
    #: and the codes' block axis is the capacity. `host_counts` is the same on the host.
    counts: torch.Tensor | None = None
    host_counts: tuple[int, int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """`[batch, kv_heads, tokens, head_dim]` of the K that `dense()` returns."""
        batch, heads, _, dim = self.keys.shape
        return batch, heads, self.num_tokens, dim

    def kernel_layout(self) -> KernelLayout | None:
        """The layout of the codes as their quantizer declares it (`quant.kernel_layouts`);
        None without a quantizer or for one that declares none (fused kernels then fall back)."""
        return self.quantizer.kernel_layout() if self.quantizer is not None else None

    @property
    def sink_length(self) -> int:
        return self.sink_keys.shape[-2] if self.sink_keys is not None else 0

    @property
    def quantized_tokens(self) -> int:
        if self.key_codes is None:
            return 0
        if self.host_counts is not None:
            return self.host_counts[0] * self.key_codes.block_tokens
        return self.key_codes.num_tokens

    @property
    def residual_tokens(self) -> int:
        return self.host_counts[2] if self.host_counts is not None else self.keys.shape[-2]

    @property
    def num_tokens(self) -> int:
        return self.sink_length + self.quantized_tokens + self.residual_tokens

    def residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual tokens in order (a static layer's ring unrolled)."""
        if self.host_counts is None:
            return self.keys, self.values
        _, start, count = self.host_counts
        if start == 0:  # a buffer valid from its first slot (a static dense layer): views, no copy
            return self.keys[..., :count, :], self.values[..., :count, :]
        slots = (torch.arange(count, device=self.keys.device) + start) % self.keys.shape[-2]
        return self.keys.index_select(-2, slots), self.values.index_select(-2, slots)

    def valid_codes(self) -> tuple[Codes | None, Codes | None]:
        """The codes of the stored tokens (a static layer's buffers cut to their valid blocks)."""
        if self.key_codes is None or self.host_counts is None:
            return self.key_codes, self.value_codes
        tokens = self.quantized_tokens
        return (self.key_codes.slice_blocks(0, tokens // self.key_codes.block_tokens),
                self.value_codes.slice_blocks(0, tokens // self.value_codes.block_tokens))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens in order (sinks, decoded codes, residual) in the residual's dtype."""
        residual_k, residual_v = self.residual()
        keys, values = [residual_k], [residual_v]
        key_codes, value_codes = self.valid_codes()
        if key_codes is not None and key_codes.num_blocks:
            if self.decode is None:
                raise ValueError("PackedKV with codes needs a decode function")
            keys.insert(0, self.decode(key_codes, "key", self.keys.dtype))
            values.insert(0, self.decode(value_codes, "value", self.keys.dtype))
        if self.sink_keys is not None:
            keys.insert(0, self.sink_keys)
            values.insert(0, self.sink_values)
        if len(keys) == 1:
            return residual_k, residual_v
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
