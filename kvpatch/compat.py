"""The few places where supported transformers versions differ (5.17 on the GPU image, 5.2x here).

transformers renamed the cache argument and output field from `past_key_values` to `cache`
(5.2x keeps the old name as a deprecated alias until 5.40). Everything in kvpatch that passes or
reads a cache goes through these two helpers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name `model.forward` takes the cache by: `cache` (5.2x) or `past_key_values` (older)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache a model forward returned, under either field name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def query_length(arg: Any) -> int:
    """The query length from a cache layer's `get_mask_sizes` argument: an int on transformers
    5.2x, the `cache_position` tensor on earlier 5.x."""
    return int(arg.shape[0]) if isinstance(arg, torch.Tensor) else int(arg)


def mask_query_length(mask_kwargs: dict[str, Any]) -> int | None:
    """The query length a mask function is asked for: `q_length` on transformers 5.2x, the
    length of `cache_position` on earlier 5.x; None if the caller passed neither by name."""
    if "q_length" in mask_kwargs:
        return int(mask_kwargs["q_length"])
    position = mask_kwargs.get("cache_position")
    return int(position.shape[0]) if isinstance(position, torch.Tensor) else None


def init_empty_layer(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """What `DynamicLayer.lazy_initialization` does, for kvpatch's own layers: its signature
    differs across transformers 5.x (one argument on 5.17, two on 5.24)."""
    layer.device = key_states.device
    layer.dtype = key_states.dtype
    layer.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
    layer.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
    layer.is_initialized = True
