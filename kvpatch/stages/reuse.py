"""Stages of chunk reuse: chunker, hasher, matcher and seam recompute.

They only hold validated settings; `kvpatch.reuse.controller.ReuseController` runs them around
each prefill. The chunk store stages (`store/*`) live in their own modules.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ..registry import Stage, StageParams, register_stage
from ..reuse.chunk_hash import HashAlgorithm


@register_stage("chunker", "fixed")
class FixedChunker(Stage):
    """Fixed-size chunks (default 128 tokens) with an optional boundary window and a tail chunk."""

    requires: ClassVar[tuple[str, ...]] = ("matcher", "store")

    class Params(StageParams):
        size: int = Field(default=128, ge=1)
        #: Move each cut up to this many tokens to just after a boundary token (0: never).
        boundary_window: int = Field(default=0, ge=0)
        #: Boundary tokens given by id; the Engine adds every token whose text contains a newline.
        boundary_token_ids: tuple[int, ...] = ()

    params: Params

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.boundary_tokens: frozenset[int] = frozenset(params.boundary_token_ids)

    def add_boundary_tokens(self, token_ids: set[int]) -> None:
        self.boundary_tokens = self.boundary_tokens | frozenset(token_ids)


@register_stage("hasher", "chained")
class ChainedHasher(Stage):
    """Prefix-chained and content-only chunk hashes (sha256 default; blake2b; xxhash opt-in)."""

    class Params(StageParams):
        algorithm: HashAlgorithm = "sha256"

    params: Params


@register_stage("matcher", "exact")
class ExactMatcher(Stage):
    """Reuse chunks whose whole history matches (prefix hash): lossless."""

    requires: ClassVar[tuple[str, ...]] = ("chunker", "store")
    approximate: ClassVar[bool] = False


@register_stage("matcher", "approximate")
class ApproximateMatcher(Stage):
    """Exact prefix matches first, then content-hash matches (same tokens, other history or
    position), re-rotated and repaired by the recompute stage: lossy."""

    requires: ClassVar[tuple[str, ...]] = ("chunker", "store")
    lossless: ClassVar[bool] = False
    approximate: ClassVar[bool] = True

    class Params(StageParams):
        #: How approximate chunks are repaired: always CacheBlend (positions and history are
        #: both wrong), or whatever the recompute stage does (to compare strategies).
        repair: Literal["cacheblend", "configured"] = "cacheblend"

    params: Params


class RecomputeStage(Stage):
    """Base of the seam-repair strategies; `sink_tokens` first tokens are always recomputed."""

    class Params(StageParams):
        sink_tokens: int = Field(default=0, ge=0)

    params: Any


@register_stage("recompute", "none")
class NoRecompute(RecomputeStage):
    """Reused K/V are used as they are (only missing chunks are computed)."""


@register_stage("recompute", "selective")
class SelectiveRecompute(RecomputeStage):
    """Recompute the first `seam_tokens` tokens of each reused non-prefix chunk against the real
    preceding context, in every layer."""

    class Params(RecomputeStage.Params):
        seam_tokens: int = Field(default=16, ge=0)

    params: Params


@register_stage("recompute", "cacheblend")
class CacheBlendRecompute(RecomputeStage):
    """CacheBlend: recompute every reused token up to `check_layer`, pick the `ratio` most
    deviated there, and recompute only those in the later layers."""

    class Params(RecomputeStage.Params):
        ratio: float = Field(default=0.15, ge=0.0, le=1.0)
        check_layer: int = Field(default=1, ge=0)

    params: Params
