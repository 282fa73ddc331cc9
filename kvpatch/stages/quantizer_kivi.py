"""`quantizer/kivi`: KIVI-style asymmetric integer quantization (8, 4 or 2 bits).

Keys are quantized per channel (a group of `group_size` consecutive tokens shares one scale and
zero point per channel, because key outliers live in fixed channels); values per token (groups
of `group_size` channels of one token), following KIVI (Liu et al., ICML'24). The full-precision
residual window of recent tokens is the storage layer's job (`storage/quantized`), so appending
a token never re-quantizes what is already stored.
"""

from __future__ import annotations

import torch

from ..model_shapes import ModelShapes, divisors, misfit
from ..quant.base import QuantizerStage, Role
from ..quant.codes import Codes
from ..quant.kernel_layouts import KiviPacking
from ..quant.groupwise import dequantize_groups, quantize_groups
from ..registry import register_stage
from ..stage_specs.quantizer_kivi import KiviParams


@register_stage("quantizer", "kivi")
class KiviQuantizer(QuantizerStage):
    """Asymmetric 8/4/2-bit group quantization: keys per channel, values per token."""

    Params = KiviParams
    params: KiviParams

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        if shapes.head_dim % self.params.group_size:
            return [misfit("group_size", self.params.group_size, "head_dim", shapes.head_dim,
                           f"a divisor of {shapes.head_dim} (value groups split each head's channels): "
                           f"one of {divisors(shapes.head_dim)}")]
        return []

    def block_tokens(self, role: Role) -> int:
        return self.params.group_size if role == "key" else 1

    def kernel_layout(self) -> KiviPacking:
        return KiviPacking(self.params.bits, self.params.group_size)

    def encode(self, x: torch.Tensor, role: Role) -> Codes:
        self._check_input(x, role)
        batch, heads, tokens, dim = x.shape
        g = self.params.group_size
        if role == "key":
            # [B, H, blocks, G, D] -> groups run over the G tokens of each channel.
            grouped = x.reshape(batch, heads, tokens // g, g, dim).transpose(-1, -2)
        else:
            if dim % g:
                raise ValueError(f"kivi: value group_size {g} must divide head_dim {dim}")
            grouped = x.reshape(batch, heads, tokens, dim // g, g)
        packed, scale, zero = quantize_groups(grouped, self.params.bits)
        return Codes({"packed": packed, "scale": scale, "zero": zero}, self.block_tokens(role), dim)

    def decode(self, codes: Codes, role: Role, dtype: torch.dtype) -> torch.Tensor:
        t = codes.tensors
        g = self.params.group_size
        if role == "key":
            grouped = dequantize_groups(t["packed"], t["scale"], t["zero"], self.params.bits, g)
            batch, heads, blocks = grouped.shape[:3]
            return grouped.transpose(-1, -2).reshape(batch, heads, blocks * g, codes.dim).to(dtype)
        grouped = dequantize_groups(t["packed"], t["scale"], t["zero"], self.params.bits, g)
        return grouped.flatten(-2).to(dtype)
