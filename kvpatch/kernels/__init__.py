"""Attention kernels over the cache. `torch_attention` is the reference every kernel must match.

The Triton kernels (`triton_decode`: fused decode attention over packed KIVI codes;
`triton_quantize`: KIVI quantize-and-pack) are imported only where Triton runs, through
`kvpatch.patch.attention` (`kernels: {attention: triton}`); `packed.PackedKV` is what they read.
"""

from .torch_attention import math_attention, sdpa_attention

__all__ = ["math_attention", "sdpa_attention"]
