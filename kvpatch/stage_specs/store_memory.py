"""`store/memory`: the chunk store of prefix reuse, in CPU RAM, with optional disk and Redis tiers
(kvpatch/stages/store_memory.py). Its codec decides whether it is lossless."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator

from ..errors import echo
from ..registry import StageParams, declare_stage

#: How stored chunks are encoded (kvpatch/reuse/codecs.py implements them); only `dense` is exact.
Codec = Literal["dense", "int8", "int4"]
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: Shortest chunk secret accepted (a short one can be guessed offline from any sealed value).
MIN_SECRET_BYTES = 16


def secret_problem(secret: bytes) -> str | None:
    """Why `secret` is unfit (too short to resist offline guessing), never echoing it; None: fit."""
    return f"a chunk secret must be at least {MIN_SECRET_BYTES} bytes" if len(secret) < MIN_SECRET_BYTES else None


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
    #: true: `url` is a node of a Redis Cluster; the namespace is split into `shards` hash-tagged
    #: shards spread over its slots, each holding budget_bytes / shards (kvpatch/reuse/redis_tier.py).
    cluster: bool = False
    #: Shards of the namespace on a cluster (default 16; only with cluster: true). More shards than
    #: nodes spread the chunks evenly; every shard is one call for a content lookup.
    shards: int | None = Field(default=None, ge=1, le=16384)

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in REDIS_SCHEMES:
            raise ValueError(f"{echo(url)} has scheme {echo(scheme)}; expected one of {', '.join(REDIS_SCHEMES)} "
                             "(e.g. redis://host:6379/0)")
        return url

    _secret = field_validator("secret")(_check_secret)

    @model_validator(mode="after")
    def _cluster_fits(self) -> RedisParams:
        problem = cluster_problem(self.url, self.cluster, self.shards)
        if problem is not None:
            raise ValueError(problem)
        return self


def cluster_problem(url: str, cluster: bool, shards: int | None) -> str | None:
    """Why `cluster`/`shards` do not fit `url` (a cluster is reached over TCP and has only
    database 0); None: they fit."""
    if not cluster:
        return None if shards is None else f"shards: {shards} given, but shards only apply with cluster: true"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"cluster: true needs a redis:// or rediss:// url of a cluster node, got {echo(url)}"
    if parts.path.strip("/") not in ("", "0"):
        return f"cluster: true: a Redis Cluster has only database 0, but {echo(url)} names database {parts.path.strip('/')!r}"
    return None


class MemoryStoreParams(StageParams):
    budget_bytes: ByteSize = ByteSize(4 * 2**30)
    codec: Codec = "dense"
    #: Pinned host memory (fast, asynchronous copies to the GPU); None: when CUDA is available.
    pin_memory: bool | None = None
    disk: DiskParams | None = None
    redis: RedisParams | None = None


def _dense(params: MemoryStoreParams) -> bool:
    """Lossless only when chunks are stored as they are (int8/int4 change the reused K/V)."""
    return params.codec == "dense"


declare_stage("store", "memory", "kvpatch.stages.store_memory:MemoryStore", MemoryStoreParams, lossless=_dense)
