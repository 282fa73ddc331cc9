"""`storage/dense`: full-precision K/V per layer (kvpatch/stages/storage_dense.py)."""

from __future__ import annotations

from ..registry import StageParams, declare_stage


class DenseParams(StageParams):
    #: Keep only the last `sliding_window` tokens on sliding-window layers (exact: the mask
    #: hides older tokens anyway). False keeps every token on every layer.
    trim_sliding_window: bool = True


declare_stage("storage", "dense", "kvpatch.stages.storage_dense:DenseStorage", DenseParams, builds_layers=True)
