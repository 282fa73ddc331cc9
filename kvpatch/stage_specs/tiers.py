"""`evictor/tiered`: hot / warm / cold tiers moved by importance (kvpatch/stages/tiers.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from ..params import Count, PositiveFraction, Size
from ..registry import StageParams, declare_stage
from .evictor import budget_tokens


class TierBudget(StageParams):
    """A tier's budget per layer and KV head: tokens, or a fraction of the tokens seen; neither
    means unlimited."""

    max_tokens: Count | None = None
    ratio: PositiveFraction | None = None

    @model_validator(mode="after")
    def _one(self) -> "TierBudget":
        if self.max_tokens is not None and self.ratio is not None:
            raise ValueError("a tier budget sets max_tokens or ratio, not both")
        return self

    def tokens(self, seen: int) -> int | None:
        return budget_tokens(self.max_tokens, self.ratio, seen)

    @property
    def unlimited(self) -> bool:
        return self.max_tokens is None and self.ratio is None


class TieredParams(StageParams):
    #: Full-precision tokens on the accelerator (sinks and the recent window included).
    hot: TierBudget = TierBudget(max_tokens=256)
    #: Quantized tokens on the accelerator; unlimited by default.
    warm: TierBudget = TierBudget()
    #: Quantized tokens in host memory (needs an offloader); unlimited by default,
    #: `{max_tokens: 0}` drops what leaves warm.
    cold: TierBudget = TierBudget()
    sink_tokens: Count = 4
    recent_tokens: Count = 32
    granularity: Literal["head", "layer"] = "head"
    #: Decode steps between promotion rounds (multi-token forwards always run one); None: off.
    promote_every: Size | None = 16
    #: Recent queries that promotion scores cold and warm blocks against.
    promote_window: Size = 32
    #: Most blocks per head swapped in one round.
    promote_blocks: Size = 4
    #: Decode steps whose queries are scored together, in one pass, instead of one pass per
    #: step (the scorer's kernels are most of a step's overhead). H2O's sums come out the
    #: same (each query is causally masked to the keys it saw, no token moves tier while
    #: queries are pending); a decaying scorer decays once per pass instead of per step.
    score_every: Size = 1
    #: Decode warm codes and join them to hot through torch.compile on an accelerator: eager,
    #: that is a dozen kernels per layer and forward, most of a decode step's overhead. Eager
    #: on the CPU, where a compile costs more than it saves.
    compile_decode: bool = False

    @model_validator(mode="after")
    def _hot_holds_protected(self) -> "TieredParams":
        if self.hot.max_tokens is not None and self.hot.max_tokens < self.sink_tokens + self.recent_tokens:
            raise ValueError(f"hot.max_tokens ({self.hot.max_tokens}) must hold the sink and recent tokens "
                             f"({self.sink_tokens} + {self.recent_tokens}), which never leave hot")
        return self


declare_stage("evictor", "tiered", "kvpatch.stages.tiers:TieredEvictor", TieredParams,
              lossless=False, requires=("scorer",), builds_layers=True)
