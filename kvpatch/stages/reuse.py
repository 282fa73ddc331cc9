"""Stages of chunk reuse: chunker, hasher, matcher and seam recompute.

They only hold validated settings; `kvpatch.patch.reuse_controller.ReuseController` runs them around
each prefill. The chunk store stages (`store/*`) live in their own modules.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Strict

from ..model_shapes import ModelShapes, misfit
from ..params import Count, Fraction, Size, TokenId
from ..registry import Stage, StageParams, register_stage
from ..reuse.chunk_hash import HashAlgorithm


@register_stage("chunker", "fixed")
class FixedChunker(Stage):
    """Fixed-size chunks (default 128 tokens) with an optional boundary window and a tail chunk."""

    requires: ClassVar[tuple[str, ...]] = ("matcher", "store")

    class Params(StageParams):
        size: Size = 128
        #: Move each cut up to this many tokens to just after a boundary token (0: never).
        boundary_window: Count = 0
        #: Boundary tokens given by id; the Engine adds every token whose text contains a newline.
        boundary_token_ids: Annotated[tuple[TokenId, ...], Strict(False)] = ()  # a YAML list is fine

    params: Params

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        outside = sorted(i for i in self.params.boundary_token_ids if i >= shapes.vocab_size)
        if outside:
            return [misfit("boundary_token_ids", outside[:8], "vocab_size", shapes.vocab_size,
                           f"token ids below {shapes.vocab_size}")]
        return []

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
        sink_tokens: Count = 0

    params: Any


@register_stage("recompute", "none")
class NoRecompute(RecomputeStage):
    """Reused K/V are used as they are (only missing chunks are computed)."""


@register_stage("recompute", "selective")
class SelectiveRecompute(RecomputeStage):
    """Recompute the first `seam_tokens` tokens of each reused non-prefix chunk against the real
    preceding context, in every layer."""

    class Params(RecomputeStage.Params):
        seam_tokens: Count = 16

    params: Params


@register_stage("recompute", "cacheblend")
class CacheBlendRecompute(RecomputeStage):
    """CacheBlend: recompute every reused token up to `check_layer`, pick the `ratio` most
    deviated there, and recompute only those in the later layers."""

    class Params(RecomputeStage.Params):
        ratio: Fraction = 0.15
        #: Layer whose deviations pick the tokens to recompute (the default is clamped to the
        #: model's last layer; a value set explicitly must exist).
        check_layer: Count = 1

    params: Params

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        layer = self.params.check_layer
        if "check_layer" in self.params.model_fields_set and layer >= shapes.num_layers:
            return [misfit("check_layer", layer, "number of layers", shapes.num_layers,
                           f"a layer index below {shapes.num_layers}")]
        return []
