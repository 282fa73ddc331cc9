"""`evictor/budget`: a token budget per layer, lowest-scored tokens dropped (kvpatch/stages/evictor.py)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import model_validator

from ..params import Count, Fraction, PositiveFraction, Size
from ..registry import StageParams, declare_stage

DEFAULT_RATIO = 0.25


def budget_tokens(max_tokens: int | None, ratio: float | None, seen: int) -> int | None:
    """A budget given as a token count or as a fraction of the tokens seen; None: unlimited."""
    if max_tokens is not None:
        return max_tokens
    if ratio is not None:
        return max(1, math.ceil(ratio * seen))
    return None


class BudgetParams(StageParams):
    #: Fixed budget in tokens per layer (and head) ...
    max_tokens: Size | None = None
    #: ... or a fraction of the tokens seen so far (0.25 = a 4x smaller cache; the default
    #: when neither is set).
    ratio: PositiveFraction | None = None
    #: First tokens always kept (attention sinks).
    sink_tokens: Count = 4
    #: Most recent tokens always kept; `recent_fraction` reserves a share of the budget
    #: for recency instead (the larger of the two applies): the "split ratio" of hybrid
    #: truncation.
    recent_tokens: Count = 16
    recent_fraction: Fraction = 0.0
    granularity: Literal["head", "layer"] = "head"
    #: During decode, evict every `every` forwards (the cache grows by up to every-1 tokens
    #: past the budget in between); prefills always evict.
    every: Size = 1

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("max_tokens") is not None and data.get("ratio") is not None:
                raise ValueError("set exactly one of max_tokens or ratio")
            if data.get("max_tokens") is None and data.get("ratio") is None:
                data = {**data, "ratio": DEFAULT_RATIO}
        return data


declare_stage("evictor", "budget", "kvpatch.stages.evictor:BudgetEvictor", BudgetParams,
              lossless=False, requires=("scorer",), builds_layers=True)
