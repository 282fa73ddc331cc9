"""`store/memory`: the chunk store of prefix reuse, in CPU RAM, with optional disk and Redis tiers.

    - kind: store
      impl: memory
      params:
        budget_bytes: 8GiB            # RAM; LFU + recency eviction (kvpatch/reuse/memory_store.py)
        codec: int8                   # dense | int8 | int4 (KIVI layout, kvpatch/reuse/codecs.py)
        disk: {path: /var/cache/kvpatch/chunks, budget_bytes: 100GiB}     # RAM overflow spills here
        redis: {url: redis://10.0.0.5:6379/0, budget_bytes: 20GiB, ttl_s: 86400}  # shared by a fleet

Shared tiers are authenticated (HMAC-SHA256 under a secret: `secret` here or the
KVPATCH_CHUNK_SECRET environment variable; docs/security.md): Redis always unless
`authenticate: false`; the disk tier whenever a secret is available, and it refuses to run
without one in a folder other users can write to.

One stage, one design: the tiers are options of the store, since a remote tier is only fast
behind a local RAM tier. If a config has an `index` stage (`index/fibonacci`), RAM slots are
found through it. The stage is itself the `ChunkStore` (a `TieredChunkStore`) the reuse pipeline calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ByteSize, Field, SecretStr, field_validator

from ..errors import echo
from ..registry import Stage, StageParams, register_stage
from ..reuse.codecs import Codec
from ..reuse.disk_tier import DiskTier
from ..reuse.memory_store import TieredChunkStore
from ..reuse.sealed import secret_problem

REDIS_SCHEMES = ("redis", "rediss", "unix")


def _check_secret(secret: SecretStr | None) -> SecretStr | None:
    """Long enough to resist offline guessing; never echoed in the error."""
    problem = secret_problem(secret.get_secret_value().encode()) if secret is not None else None
    if problem is not None:
        raise ValueError(problem)
    return secret


class DiskParams(StageParams):
    """A directory of chunk files (may be shared by processes on one machine)."""

    path: str = Field(min_length=1)
    budget_bytes: ByteSize = ByteSize(64 * 2**30)
    #: HMAC secret for the chunk files (default: $KVPATCH_CHUNK_SECRET, if set).
    secret: SecretStr | None = None

    @field_validator("path")
    @classmethod
    def _directory(cls, path: str) -> str:
        if Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"{echo(path)} exists and is not a directory; expected a directory (created if missing)")
        return path

    _secret = field_validator("secret")(_check_secret)


class RedisParams(StageParams):
    """A Redis server shared by every process that names the same url and namespace."""

    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field(default="kvpatch", pattern=r"^[^\s:]+$")
    budget_bytes: ByteSize | None = None
    ttl_s: float | None = Field(default=None, gt=0)
    #: Socket timeouts; a server that does not answer within this is treated as down.
    timeout_s: float = Field(default=0.5, gt=0)
    #: While down, calls are skipped (misses) for this long before the next try.
    retry_s: float = Field(default=5.0, ge=0)
    #: HMAC secret shared by every process of the fleet (default: $KVPATCH_CHUNK_SECRET).
    secret: SecretStr | None = None
    #: false: values are not authenticated (only for a Redis that only trusted processes can write).
    authenticate: bool = True

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in REDIS_SCHEMES:
            raise ValueError(f"{echo(url)} has scheme {echo(scheme)}; expected one of {', '.join(REDIS_SCHEMES)} "
                             "(e.g. redis://host:6379/0)")
        return url

    _secret = field_validator("secret")(_check_secret)


@register_stage("store", "memory")
class MemoryStore(TieredChunkStore, Stage):
    """Chunk K/V in CPU RAM within a byte budget, spilling to an optional disk tier, shared
    through an optional Redis tier; quantized (int8/int4) if asked."""

    class Params(StageParams):
        budget_bytes: ByteSize = ByteSize(4 * 2**30)
        codec: Codec = "dense"
        #: Pinned host memory (fast, asynchronous copies to the GPU); None: when CUDA is available.
        pin_memory: bool | None = None
        disk: DiskParams | None = None
        redis: RedisParams | None = None

    params: Params

    def __init__(self, params: Params) -> None:
        Stage.__init__(self, params)
        d = params.disk
        disk = DiskTier(d.path, d.budget_bytes, _plain(d.secret)) if d is not None else None
        remote = None
        if params.redis is not None:
            from ..reuse.redis_tier import RedisTier

            r = params.redis
            remote = RedisTier(r.url, r.namespace, r.budget_bytes, r.ttl_s, r.timeout_s, r.retry_s,
                               _plain(r.secret), r.authenticate)
        TieredChunkStore.__init__(self, params.budget_bytes, params.codec, params.pin_memory, disk, remote)

    @classmethod
    def is_lossless(cls, params: StageParams) -> bool:
        return getattr(params, "codec", "dense") == "dense"

    def connect(self, stages: Sequence[Stage]) -> None:
        index = next((s for s in stages if s.kind == "index"), None)
        if index is not None:
            self.use_index(index)  # type: ignore[arg-type]  # index stages implement ChunkIndex


def _plain(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None
