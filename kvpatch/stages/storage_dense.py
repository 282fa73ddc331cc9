"""Dense storage: full-precision K/V per layer, exactly as transformers' DynamicCache keeps it."""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..cache import LayerLayout
from ..registry import Stage, StageParams, register_stage


@register_stage("storage", "dense")
class DenseStorage(Stage):
    """Lossless storage; the default when a config names no storage stage."""

    builds_layers = True

    class Params(StageParams):
        #: Keep only the last `sliding_window` tokens on sliding-window layers (exact: the mask
        #: hides older tokens anyway). False keeps every token on every layer.
        trim_sliding_window: bool = True

    params: Params

    def make_layer(self, layout: LayerLayout) -> CacheLayerMixin:
        if layout.sliding_window is not None and self.params.trim_sliding_window:
            return DynamicSlidingWindowLayer(sliding_window=layout.sliding_window)
        return DynamicLayer()
