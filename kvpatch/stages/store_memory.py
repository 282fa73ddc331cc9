"""`store/memory`: the chunk store of prefix reuse, in CPU RAM, with optional disk and Redis tiers.

    - kind: store
      impl: memory
      params:
        budget_bytes: 8GiB            # RAM; LFU + recency eviction (kvpatch/reuse/memory_store.py)
        codec: int8                   # dense | int8 | int4 (KIVI layout, kvpatch/reuse/codecs.py)
        disk: {path: /var/cache/kvpatch/chunks, budget_bytes: 100GiB}     # RAM overflow spills here
        redis: {url: redis://10.0.0.5:6379/0, budget_bytes: 20GiB, ttl_s: 86400}  # shared by a fleet
        # or a Redis Cluster: {url: redis://10.0.0.5:7000, cluster: true, shards: 16}

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

from pydantic import SecretStr

from ..registry import Stage, register_stage
from ..reuse.disk_tier import DiskTier
from ..reuse.memory_store import TieredChunkStore
from ..stage_specs.store_memory import MemoryStoreParams


@register_stage("store", "memory")
class MemoryStore(TieredChunkStore, Stage):
    """Chunk K/V in CPU RAM within a byte budget, spilling to an optional disk tier, shared
    through an optional Redis tier; quantized (int8/int4) if asked."""

    Params = MemoryStoreParams
    params: MemoryStoreParams

    def __init__(self, params: MemoryStoreParams) -> None:
        Stage.__init__(self, params)
        d = params.disk
        disk = DiskTier(d.path, d.budget_bytes, _plain(d.secret)) if d is not None else None
        remote = None
        if params.redis is not None:
            from ..reuse.redis_tier import RedisTier

            r = params.redis
            remote = RedisTier(r.url, r.namespace, r.budget_bytes, r.ttl_s, r.timeout_s, r.retry_s,
                               _plain(r.secret), r.authenticate, r.cluster, r.shards)
        TieredChunkStore.__init__(self, params.budget_bytes, params.codec, params.pin_memory, disk, remote)

    def connect(self, stages: Sequence[Stage]) -> None:
        index = next((s for s in stages if s.kind == "index"), None)
        if index is not None:
            self.use_index(index)  # type: ignore[arg-type]  # index stages implement ChunkIndex


def _plain(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None
