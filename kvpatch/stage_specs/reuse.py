"""Stages of chunk reuse: chunker, hasher, matchers and seam recompute (kvpatch/stages/reuse.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Strict

from ..params import Count, Fraction, Size, TokenId
from ..registry import StageParams, declare_stage

#: Chunk hash functions (kvpatch/reuse/chunk_hash.py implements them).
HashAlgorithm = Literal["sha256", "blake2b", "xxhash"]


class FixedChunkerParams(StageParams):
    size: Size = 128
    #: Move each cut up to this many tokens to just after a boundary token (0: never).
    boundary_window: Count = 0
    #: Boundary tokens given by id; the Engine adds every token whose text contains a newline.
    boundary_token_ids: Annotated[tuple[TokenId, ...], Strict(False)] = ()  # a YAML list is fine


class ChainedHasherParams(StageParams):
    algorithm: HashAlgorithm = "sha256"


class ApproximateMatcherParams(StageParams):
    #: How approximate chunks are repaired: always CacheBlend (positions and history are
    #: both wrong), or whatever the recompute stage does (to compare strategies).
    repair: Literal["cacheblend", "configured"] = "cacheblend"


class RecomputeParams(StageParams):
    """Every seam-repair strategy: the `sink_tokens` first tokens are always recomputed."""

    sink_tokens: Count = 0


class SelectiveRecomputeParams(RecomputeParams):
    seam_tokens: Count = 16


class CacheBlendParams(RecomputeParams):
    ratio: Fraction = 0.15
    #: Layer whose deviations pick the tokens to recompute (the default is clamped to the
    #: model's last layer; a value set explicitly must exist).
    check_layer: Count = 1


STAGES = "kvpatch.stages.reuse"
declare_stage("chunker", "fixed", f"{STAGES}:FixedChunker", FixedChunkerParams, requires=("matcher", "store"))
declare_stage("hasher", "chained", f"{STAGES}:ChainedHasher", ChainedHasherParams)
declare_stage("matcher", "exact", f"{STAGES}:ExactMatcher", requires=("chunker", "store"))
declare_stage("matcher", "approximate", f"{STAGES}:ApproximateMatcher", ApproximateMatcherParams,
              requires=("chunker", "store"), lossless=False)
declare_stage("recompute", "none", f"{STAGES}:NoRecompute", RecomputeParams)
declare_stage("recompute", "selective", f"{STAGES}:SelectiveRecompute", SelectiveRecomputeParams)
declare_stage("recompute", "cacheblend", f"{STAGES}:CacheBlendRecompute", CacheBlendParams)
