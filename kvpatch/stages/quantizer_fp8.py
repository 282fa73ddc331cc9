"""`quantizer/fp8`: K/V as 8-bit floats (e4m3 or e5m2) with a float32 scale per group of channels.

FP8 is what vLLM and SGLang offer as their compressed cache. Each token's head vector is split
into groups of `group_size` channels (default: the whole head, one scale per token and head);
a group is divided by `absmax / max_finite` so that its largest element lands on the format's
largest finite value, then rounded to the nearest fp8 (round-to-nearest-even, saturating).
e4m3 keeps 3 mantissa bits (relative step 2**-4), e5m2 two (2**-3) with a wider exponent range.
Codes are stored as uint8 bit patterns, so snapshots and chunk files need no fp8 dtype.

Cost: 8 bits per element + 32 / group_size for the scale (8.25 bits at head_dim 128).
"""

from __future__ import annotations

import torch

from ..model_shapes import ModelShapes, divisors, misfit
from ..quant.base import QuantizerStage, Role
from ..quant.codes import Codes
from ..registry import register_stage
from ..stage_specs.quantizer_fp8 import Fp8Params

FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@register_stage("quantizer", "fp8")
class Fp8Quantizer(QuantizerStage):
    """8-bit floating-point K/V (e4m3 or e5m2), a float32 scale per token and channel group."""

    Params = Fp8Params
    params: Fp8Params

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        group = self.params.group_size
        if group is not None and shapes.head_dim % group:
            return [misfit("group_size", group, "head_dim", shapes.head_dim,
                           f"a divisor of {shapes.head_dim}: one of {divisors(shapes.head_dim)}")]
        return []

    def encode(self, x: torch.Tensor, role: Role) -> Codes:
        self._check_input(x, role)
        batch, heads, tokens, dim = x.shape
        group = self.params.group_size or dim
        fp8 = FORMATS[self.params.format]
        grouped = x.float().reshape(batch, heads, tokens, dim // group, group)
        scale = grouped.abs().amax(dim=-1, keepdim=True) / torch.finfo(fp8).max
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
        codes = (grouped / scale).clamp(-torch.finfo(fp8).max, torch.finfo(fp8).max).to(fp8)
        return Codes({"codes": codes.view(torch.uint8).reshape(batch, heads, tokens, dim),
                      "scale": scale.squeeze(-1)}, 1, dim)

    def decode(self, codes: Codes, role: Role, dtype: torch.dtype) -> torch.Tensor:
        bits, scale = codes.tensors["codes"], codes.tensors["scale"]
        batch, heads, tokens, dim = bits.shape
        groups = scale.shape[-1]
        values = bits.view(FORMATS[self.params.format]).float().reshape(batch, heads, tokens, groups, dim // groups)
        return (values * scale.unsqueeze(-1)).reshape(batch, heads, tokens, dim).to(dtype)
