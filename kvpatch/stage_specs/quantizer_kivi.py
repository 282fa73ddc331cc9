"""`quantizer/kivi`: asymmetric 8/4/2-bit group quantization (kvpatch/stages/quantizer_kivi.py)."""

from __future__ import annotations

from typing import Literal

from ..params import Size
from ..registry import StageParams, declare_stage


class KiviParams(StageParams):
    bits: Literal[2, 4, 8] = 4
    #: Tokens per key group (per-channel scales) and channels per value group (per-token
    #: scales). Costs 32 / group_size bits per element for the float16 scale + zero point.
    group_size: Size = 32


declare_stage("quantizer", "kivi", "kvpatch.stages.quantizer_kivi:KiviQuantizer", KiviParams, lossless=False)
