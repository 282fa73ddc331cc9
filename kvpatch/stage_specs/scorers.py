"""Token-importance scorers (kvpatch/stages/scorers.py)."""

from __future__ import annotations

from typing import Literal

from ..params import Fraction, Size, Weight
from ..registry import StageParams, declare_stage


class SnapKVParams(StageParams):
    window: Size = 32
    kernel: Size = 7
    pooling: Literal["avg", "max"] = "avg"


class HybridParams(StageParams):
    decay: Fraction = 0.9
    w_attn: Weight = 1.0
    w_recency: Weight = 0.1
    window: Size = 32


declare_stage("scorer", "h2o", "kvpatch.stages.scorers:H2OScorer")
declare_stage("scorer", "snapkv", "kvpatch.stages.scorers:SnapKVScorer", SnapKVParams)
declare_stage("scorer", "tova", "kvpatch.stages.scorers:TOVAScorer")
declare_stage("scorer", "streaming", "kvpatch.stages.scorers:StreamingScorer")
declare_stage("scorer", "key_norm", "kvpatch.stages.scorers:KeyNormScorer")
declare_stage("scorer", "hybrid", "kvpatch.stages.scorers:HybridScorer", HybridParams)
