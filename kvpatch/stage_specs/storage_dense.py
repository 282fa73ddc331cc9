"""`storage/dense`: full-precision K/V per layer (kvpatch/stages/storage_dense.py)."""

from __future__ import annotations

from ..params import Size
from ..registry import StageParams, declare_stage


class DenseParams(StageParams):
    #: Keep only the last `sliding_window` tokens on sliding-window layers (exact: the mask
    #: hides older tokens anyway). False keeps every token on every layer.
    trim_sliding_window: bool = True
    #: Full-attention layers keep K/V in preallocated buffers with the length on the device
    #: (StaticDenseLayer): what CUDA-graph decode (`compile: {cuda_graphs: true}`) replays.
    static: bool = False
    #: Slots to preallocate with `static` (None: the prompt plus an eighth; buffers grow when full).
    capacity_tokens: Size | None = None


declare_stage("storage", "dense", "kvpatch.stages.storage_dense:DenseStorage", DenseParams, builds_layers=True)
