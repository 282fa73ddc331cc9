"""Attention kernels over the cache. `torch_attention` is the reference every kernel must match."""

from .torch_attention import math_attention, sdpa_attention

__all__ = ["math_attention", "sdpa_attention"]
