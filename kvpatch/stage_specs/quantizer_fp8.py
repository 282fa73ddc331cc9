"""`quantizer/fp8`: 8-bit floating-point K/V (kvpatch/stages/quantizer_fp8.py)."""

from __future__ import annotations

from typing import Literal

from ..params import Size
from ..registry import StageParams, declare_stage


class Fp8Params(StageParams):
    format: Literal["e4m3", "e5m2"] = "e4m3"
    #: Channels sharing one scale; None: the whole head (one scale per token and head).
    group_size: Size | None = None


declare_stage("quantizer", "fp8", "kvpatch.stages.quantizer_fp8:Fp8Quantizer", Fp8Params, lossless=False)
