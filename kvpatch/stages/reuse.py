"""Stages of chunk reuse: chunker, hasher, matcher and seam recompute.

They hold validated settings; `kvpatch.patch.reuse_controller.ReuseController` runs them around
each prefill, through the methods a stage of each kind implements (a plug-in implements the same):
a chunker's `spans(token_ids, segment_starts)`, a hasher's `make_hasher(namespace)` (an object
like `reuse.chunk_hash.ChunkHasher`), a matcher's `approximate` flag and `match(...)` (a
`reuse.matcher.MatchPlan`), a recompute stage's `strategy` and, optionally,
`recompute_positions(spans, until)`. The chunk store stages (`store/*`) live in their own modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ..model_shapes import ModelShapes, misfit
from ..registry import Stage, register_stage
from ..reuse.chunk import ChunkStore
from ..reuse.chunk_hash import ChunkHasher
from ..reuse.chunker import Span, chunk_spans
from ..reuse.matcher import MatchPlan, match_chunks
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

    def spans(self, token_ids: Sequence[int], segment_starts: Sequence[int] = ()) -> list[Span]:
        """Half-open chunk spans covering `token_ids`; each segment start begins a new chunk."""
        p = self.params
        return chunk_spans(token_ids, p.size, p.boundary_window, self.boundary_tokens, segment_starts)


@register_stage("hasher", "chained")
class ChainedHasher(Stage):
    """Prefix-chained and content-only chunk hashes (sha256 default; blake2b; xxhash opt-in)."""

    Params = ChainedHasherParams
    params: ChainedHasherParams

    def make_hasher(self, namespace: str) -> ChunkHasher:
        """The chunk keys of one model (`namespace`: its fingerprint)."""
        return ChunkHasher(namespace, self.params.algorithm)


class MatcherStage(Stage):
    """Base of the matchers: `match` plans one prompt row's reuse from its chunk hashes."""

    #: Whether it may match chunks by content alone (then the controller re-rotates their keys).
    approximate: ClassVar[bool] = False

    def match(self, spans: Sequence[Span], prefix_hashes: Sequence[str], content_hashes: Sequence[str],
              store: ChunkStore, approximate: bool) -> MatchPlan:
        """`approximate` is off for batches of several rows (and models without re-rotation)."""
        return match_chunks(spans, prefix_hashes, content_hashes, store, approximate=approximate)


@register_stage("matcher", "exact")
class ExactMatcher(MatcherStage):
    """Reuse chunks whose whole history matches (prefix hash): lossless."""


@register_stage("matcher", "approximate")
class ApproximateMatcher(MatcherStage):
    """Exact prefix matches first, then content-hash matches (same tokens, other history or
    position), re-rotated and repaired by the recompute stage: lossy."""

    approximate: ClassVar[bool] = True
    Params = ApproximateMatcherParams
    params: ApproximateMatcherParams


class RecomputeStage(Stage):
    """Base of the seam-repair strategies; `sink_tokens` first tokens are always recomputed.
    `strategy` names the repair `reuse.blend` applies (a subclass under another name keeps its
    parent's); a stage may also define `recompute_positions(spans, until)`: positions, besides
    the strategy's, to recompute in every layer, given the approximate chunks' spans."""

    #: none | selective | cacheblend (reuse/blend.py).
    strategy: ClassVar[str] = "none"
    Params = RecomputeParams
    params: Any


@register_stage("recompute", "none")
class NoRecompute(RecomputeStage):
    """Reused K/V are used as they are (only missing chunks are computed)."""


@register_stage("recompute", "selective")
class SelectiveRecompute(RecomputeStage):
    """Recompute the first `seam_tokens` tokens of each reused non-prefix chunk against the real
    preceding context, in every layer."""

    strategy = "selective"
    Params = SelectiveRecomputeParams
    params: SelectiveRecomputeParams


@register_stage("recompute", "cacheblend")
class CacheBlendRecompute(RecomputeStage):
    """CacheBlend: recompute every reused token up to `check_layer`, pick the `ratio` most
    deviated there, and recompute only those in the later layers."""

    strategy = "cacheblend"
    Params = CacheBlendParams
    params: CacheBlendParams

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        layer = self.params.check_layer
        if "check_layer" in self.params.model_fields_set and layer >= shapes.num_layers:
            return [misfit("check_layer", layer, "number of layers", shapes.num_layers,
                           f"a layer index below {shapes.num_layers}")]
        return []
