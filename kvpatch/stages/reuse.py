"""Stages of chunk reuse: chunker, hasher, matcher and seam recompute.

They only hold validated settings; `kvpatch.patch.reuse_controller.ReuseController` runs them around
each prefill. The chunk store stages (`store/*`) live in their own modules.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..model_shapes import ModelShapes, misfit
from ..registry import Stage, register_stage
from ..stage_specs.reuse import (
    ApproximateMatcherParams,
    CacheBlendParams,
    ChainedHasherParams,
    FixedChunkerParams,
    RecomputeParams,
    SelectiveRecomputeParams,
)


@register_stage("chunker", "fixed")
class FixedChunker(Stage):
    """Fixed-size chunks (default 128 tokens) with an optional boundary window and a tail chunk."""

    Params = FixedChunkerParams
    params: FixedChunkerParams

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        outside = sorted(i for i in self.params.boundary_token_ids if i >= shapes.vocab_size)
        if outside:
            return [misfit("boundary_token_ids", outside[:8], "vocab_size", shapes.vocab_size,
                           f"token ids below {shapes.vocab_size}")]
        return []

    def __init__(self, params: FixedChunkerParams) -> None:
        super().__init__(params)
        self.boundary_tokens: frozenset[int] = frozenset(params.boundary_token_ids)

    def add_boundary_tokens(self, token_ids: set[int]) -> None:
        self.boundary_tokens = self.boundary_tokens | frozenset(token_ids)


@register_stage("hasher", "chained")
class ChainedHasher(Stage):
    """Prefix-chained and content-only chunk hashes (sha256 default; blake2b; xxhash opt-in)."""

    Params = ChainedHasherParams
    params: ChainedHasherParams


@register_stage("matcher", "exact")
class ExactMatcher(Stage):
    """Reuse chunks whose whole history matches (prefix hash): lossless."""

    approximate: ClassVar[bool] = False


@register_stage("matcher", "approximate")
class ApproximateMatcher(Stage):
    """Exact prefix matches first, then content-hash matches (same tokens, other history or
    position), re-rotated and repaired by the recompute stage: lossy."""

    approximate: ClassVar[bool] = True
    Params = ApproximateMatcherParams
    params: ApproximateMatcherParams


class RecomputeStage(Stage):
    """Base of the seam-repair strategies; `sink_tokens` first tokens are always recomputed."""

    Params = RecomputeParams
    params: Any


@register_stage("recompute", "none")
class NoRecompute(RecomputeStage):
    """Reused K/V are used as they are (only missing chunks are computed)."""


@register_stage("recompute", "selective")
class SelectiveRecompute(RecomputeStage):
    """Recompute the first `seam_tokens` tokens of each reused non-prefix chunk against the real
    preceding context, in every layer."""

    Params = SelectiveRecomputeParams
    params: SelectiveRecomputeParams


@register_stage("recompute", "cacheblend")
class CacheBlendRecompute(RecomputeStage):
    """CacheBlend: recompute every reused token up to `check_layer`, pick the `ratio` most
    deviated there, and recompute only those in the later layers."""

    Params = CacheBlendParams
    params: CacheBlendParams

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        layer = self.params.check_layer
        if "check_layer" in self.params.model_fields_set and layer >= shapes.num_layers:
            return [misfit("check_layer", layer, "number of layers", shapes.num_layers,
                           f"a layer index below {shapes.num_layers}")]
        return []
