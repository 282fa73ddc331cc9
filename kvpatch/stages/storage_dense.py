"""Dense storage: full-precision K/V per layer, exactly as transformers' DynamicCache keeps it
(or, with `static`, in fixed buffers that CUDA-graph decode can replay: storage_dense_static.py)."""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..cache import LayerLayout
from ..registry import Stage, register_stage
from ..stage_specs.storage_dense import DenseParams
from .storage_dense_static import StaticDenseLayer


@register_stage("storage", "dense")
class DenseStorage(Stage):
    """Lossless storage; the default when a config names no storage stage."""

    Params = DenseParams
    params: DenseParams

    def make_layer(self, layout: LayerLayout) -> CacheLayerMixin:
        if layout.sliding_window is not None and self.params.trim_sliding_window:
            return DynamicSlidingWindowLayer(sliding_window=layout.sliding_window)
        if self.params.static:
            return StaticDenseLayer(self.params.capacity_tokens)
        return DynamicLayer()
