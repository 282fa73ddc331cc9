"""Stages of chunk reuse: chunker, hasher, matchers and seam recompute (kvpatch/stages/reuse.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Strict

from ..params import Count, Fraction, Size, TokenId
from ..registry import StageParams, declare_stage

#: Chunk hash functions (kvpatch/reuse/chunk_hash.py implements them; docs/hashing.md measures
#: them). blake3 needs the blake3 package and xxhash the xxhash package (`kvpatch[fast-hash]`).
HashAlgorithm = Literal["sha256", "blake2b", "blake3", "xxhash"]
#: Algorithms whose keys may be persisted or shared (disk and Redis tiers, chunk-store
#: snapshots): collision resistant, so a chunk whose token ids hash to its key is that key's
#: chunk. XXH3 is not (collisions can be constructed): xxhash keys index RAM-only stores.
SHAREABLE_ALGORITHMS = frozenset({"sha256", "blake2b", "blake3"})


def unshareable_problem(algorithm: str, where: str) -> str:
    return (f"hasher/chained algorithm {algorithm!r} is not collision resistant, so its chunk keys may only "
            f"index a RAM-only store, but {where} would persist or share them (a chunk with other tokens "
            "that hash to the same key would be used as this one); use sha256 (the default), blake3 or blake2b")


def shared_key_problems(stages: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[str]:
    """Config-level check over (kind, impl, params) of a pipeline's stages: an xxhash hasher with
    a `store/memory` that has a disk or Redis tier."""
    algorithms = {p.get("algorithm", "sha256") for kind, impl, p in stages if (kind, impl) == ("hasher", "chained")}
    tiers = [f"store/memory's {tier} tier" for kind, impl, p in stages if (kind, impl) == ("store", "memory")
             for tier in ("disk", "redis") if p.get(tier) is not None]
    weak = sorted(a for a in algorithms if isinstance(a, str) and a not in SHAREABLE_ALGORITHMS)
    return [unshareable_problem(a, " and ".join(tiers)) for a in weak] if tiers else []


class FixedChunkerParams(StageParams):
    size: Size = 128
    #: Move each cut up to this many tokens to just after a boundary token (0: never).
    boundary_window: Count = 0
    #: Boundary tokens given by id; the Engine adds every token whose text contains a newline.
    boundary_token_ids: Annotated[tuple[TokenId, ...], Strict(False)] = ()  # a YAML list is fine


class ChainedHasherParams(StageParams):
    #: sha256 (default: with SHA-NI faster than blake3 on ~1 KiB chunk messages), blake2b, blake3, or
    #: xxhash (RAM-only stores: refused with a disk or Redis tier and for chunk-store snapshots).
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
