"""`TieredChunkStore`: chunks in CPU RAM within a byte budget, over optional disk and Redis tiers.

RAM eviction is LFU with a recency tiebreak and aging: the victim is the chunk with the fewest
hits, the least recently used among equals; every `AGING_PERIOD` x (chunks held) accesses all hit
counts are halved, so a chunk that was popular long ago does not stay forever. (Pure LRU lets
one long request flush a system prompt that every request shares; pure LFU never forgets.)

Tiers, fastest first: RAM -> disk (`DiskTier`: RAM evictions spill there, write-back) -> Redis
(`RedisTier`: every put is written through, so other processes see it at once). A hit in a lower
tier promotes the chunk into RAM. Chunks are kept under `codec` ("dense", "int8", "int4";
`codecs.py`), in pinned host memory when `pin_memory` (default: when CUDA is available) so that
`dense_kv` copies them to the GPU asynchronously. Keys map to RAM slots through a `ChunkIndex`
(the config's `index/fibonacci` stage if it has one, else a dict).

Every chunk is checked against what the store is for before it is used. `bind(hasher, shapes)`
(the reuse controller does it at `apply`) ties the store to one model: then a chunk is admitted
(on `put`, and on every read from a lower tier) only if its namespace is the hasher's, its token
ids hash to its keys (`ChunkHasher.binding_problem`) and it has one K/V per layer of the model with
its kv_heads and head_dim (a chunk written while a request was half done is refused, not stored).
Every read, RAM included, checks that the chunk is the one of the key asked for. A refused chunk is
a miss, counted by reason in `stats()` ("corrupt", "foreign", "unauthenticated"), one warning per
tier and reason, and never used. All index mutations happen under one lock, so the write-back
side (another thread) and requests may call the store concurrently.
"""

from __future__ import annotations

import heapq
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..host_memory import host_empty
from ..model_shapes import ModelShapes
from .index import ChunkIndex, DictSlots
from .chunk import ChunkForeignError, ChunkFormatError, StoredChunk
from .chunk_hash import ChunkHasher
from .codecs import encode_chunk, kv_shape
from .disk_tier import DiskTier

#: Hit counts halve after this many accesses per chunk held (see the module docstring).
AGING_PERIOD = 8


class LowerTier(Protocol):
    """A tier below RAM (`DiskTier`, `RedisTier`)."""

    name: str

    def contains(self, prefix_hash: str) -> bool: ...
    def read(self, prefix_hash: str) -> StoredChunk | None: ...
    def read_by_content(self, content_hash: str) -> StoredChunk | None: ...
    def write(self, chunk: StoredChunk) -> None: ...
    def discard(self, prefix_hash: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...


@dataclass
class _Entry:
    chunk: StoredChunk
    nbytes: int
    hits: int
    tick: int


class TieredChunkStore:
    """The `ChunkStore` of kvpatch: RAM within `budget_bytes`, then `disk`, then `remote`."""

    def __init__(self, budget_bytes: int, codec: str = "dense", pin_memory: bool | None = None,
                 disk: DiskTier | None = None, remote: LowerTier | None = None,
                 index: ChunkIndex | None = None) -> None:
        self.budget_bytes, self.codec = budget_bytes, codec
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.disk, self.remote = disk, remote
        self.index: ChunkIndex = index if index is not None else DictSlots()
        self._slots: list[_Entry | None] = []
        self._free: list[int] = []
        self._by_content: dict[str, dict[str, None]] = {}  # content hash -> prefix hashes in RAM
        self._heap: list[tuple[int, int, str]] = []  # (hits, tick, prefix hash); stale items skipped
        self._tick = self._accesses = self._bytes = 0
        self._lock = threading.RLock()
        self.counts = {"hits": 0, "misses": 0, "evictions": 0, "promotions": 0, "spills": 0, "rejected": 0,
                       "corrupt": 0, "foreign": 0, "unauthenticated": 0, "puts": 0}
        self.tier_hits = {"ram": 0, **{tier.name: 0 for tier in self.tiers()}}
        self.hasher: ChunkHasher | None = None
        self.shapes: ModelShapes | None = None
        self._warned: set[tuple[str, str]] = set()  # (tier, reason) already warned about

    @property
    def namespace(self) -> str:
        """The bound hasher's namespace, stamped on new chunks by the writer ("" while unbound)."""
        return self.hasher.namespace if self.hasher is not None else ""

    def bind(self, hasher: ChunkHasher, shapes: ModelShapes | None) -> None:
        """Admit only chunks of `hasher`'s namespace whose tokens hash to their keys and, with
        `shapes`, that have this model's layers, kv_heads and head_dim. Chunks already in RAM
        from another binding become misses. A hasher whose keys must stay in RAM (xxhash) is
        refused (ConfigError) when the store has a disk or Redis tier."""
        for tier in self.tiers():
            hasher.require_shareable(f"the store's {tier.name} tier")
        with self._lock:
            self.hasher, self.shapes = hasher, shapes

    def use_index(self, index: ChunkIndex) -> None:
        """Map keys to slots through `index` (an index stage); only while the store is empty."""
        if len(self.index):
            raise RuntimeError("cannot switch the index of a chunk store that holds chunks")
        self.index = index

    def tiers(self) -> list[LowerTier]:
        return [t for t in (self.disk, self.remote) if t is not None]

    # -- ChunkStore ---------------------------------------------------------------------------

    def contains(self, prefix_hash: str) -> bool:
        with self._lock:
            if self._entry(prefix_hash) is not None:
                return True
        return any(tier.contains(prefix_hash) for tier in self.tiers())

    def get(self, prefix_hash: str) -> StoredChunk | None:
        with self._lock:
            entry = self._entry(prefix_hash)
            if entry is not None:
                problem = self._problem(entry.chunk, prefix_hash=prefix_hash, full=False)
                if problem is None:
                    self._touch(entry)
                    self.counts["hits"] += 1
                    self.tier_hits["ram"] += 1
                    return entry.chunk
                self._remove(prefix_hash)
                self._refused("ram", ChunkForeignError(f"chunk {prefix_hash[:16]} in RAM: {problem}"))
            return self._from_tiers(lambda tier: tier.read(prefix_hash), prefix_hash=prefix_hash)

    def get_by_content(self, content_hash: str) -> StoredChunk | None:
        with self._lock:
            prefixes = self._by_content.get(content_hash)
            if prefixes:
                return self.get(next(reversed(prefixes)))
            return self._from_tiers(lambda tier: tier.read_by_content(content_hash), content_hash=content_hash)

    def put(self, chunk: StoredChunk) -> bool:
        """Keep `chunk` (its tensors may be on any device; the store keeps its own CPU copy);
        False if it was refused (not this store's model, or incomplete: see the module docstring)."""
        with self._lock:
            self.counts["puts"] += 1
            problem = self._problem(chunk)
            if problem is not None:
                self._refused("put", ChunkForeignError(f"chunk {chunk.prefix_hash[:16]} refused: {problem}"))
                return False
            entry = self._entry(chunk.prefix_hash)
            if entry is not None:
                self._touch(entry)
                return True
            stored = self._host_copy(chunk)
            self._insert(stored)
            if self.remote is not None:
                self.remote.write(stored)
            return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            ram = {"bytes": self._bytes, "chunks": len(self.index), "budget_bytes": self.budget_bytes,
                   "codec": self.codec, "pinned": self.pin_memory}
            lookups = self.counts["hits"] + self.counts["misses"]
            return {**self.counts, "hit_rate": self.counts["hits"] / lookups if lookups else None,
                    "hits_by_tier": dict(self.tier_hits), "ram": ram,
                    **{tier.name: tier.stats() for tier in self.tiers()}}

    # -- whole-store operations (snapshots, shutdown) --------------------------------------

    def iter_chunks(self) -> Iterator[StoredChunk]:
        """Every chunk in RAM, then every chunk only the disk tier holds (not Redis: it is shared
        and outlives this process anyway). No hit counting, no promotion."""
        with self._lock:
            ram = [e.chunk for e in self._slots if e is not None]
        yield from ram
        if self.disk is not None:
            seen = {c.prefix_hash for c in ram}
            for chunk in self.disk.iter_chunks():
                if chunk.prefix_hash not in seen and self._problem(chunk) is None:
                    yield chunk

    def flush(self) -> int:
        """Write every RAM chunk the disk tier lacks to it (so a later process starts warm);
        returns how many were written."""
        if self.disk is None:
            return 0
        with self._lock:
            missing = [e.chunk for e in self._slots if e is not None and not self.disk.contains(e.chunk.prefix_hash)]
            for chunk in missing:
                self.disk.write(chunk)
            self.counts["spills"] += len(missing)
            return len(missing)

    # -- internals ----------------------------------------------------------------------------

    def _entry(self, prefix_hash: str) -> _Entry | None:
        slot = self.index.get(prefix_hash.encode())
        return self._slots[slot] if slot is not None else None

    def _problem(self, chunk: StoredChunk, prefix_hash: str | None = None, content_hash: str | None = None,
                 full: bool = True) -> str | None:
        """Why `chunk` must not be used for this lookup (None: it may). Keys always; namespace
        always once bound; with `full`, token hashes and model shapes too (RAM chunks had those
        checked when they were admitted)."""
        if prefix_hash is not None and chunk.prefix_hash != prefix_hash:
            return f"it is the chunk of key {chunk.prefix_hash[:16]!r}"
        if content_hash is not None and chunk.content_hash != content_hash:
            return f"its content hash is {chunk.content_hash[:16]!r}, not {content_hash[:16]!r}"
        if self.hasher is None or (not full and chunk.namespace == self.hasher.namespace):
            return None
        problem = self.hasher.binding_problem(chunk)
        if problem is None and self.shapes is not None:
            layers, heads, _, dim = kv_shape(chunk)
            expected = (self.shapes.num_layers, self.shapes.kv_heads, self.shapes.head_dim)
            if (layers, heads, dim) != expected:
                problem = f"(layers, kv_heads, head_dim) are {(layers, heads, dim)}, the model's {expected}"
        return problem

    def _refused(self, where: str, err: ChunkFormatError) -> None:
        """Count a refused chunk by reason (a miss, never used); warn once per tier and reason."""
        self.counts[err.reason] += 1
        if (where, err.reason) not in self._warned:
            self._warned.add((where, err.reason))
            warnings.warn(f"{err}; treated as a miss (further {err.reason} chunks from {where} are only counted "
                          f"in stats()['{err.reason}'])", RuntimeWarning, stacklevel=4)

    def _from_tiers(self, read: Any, prefix_hash: str | None = None, content_hash: str | None = None) -> StoredChunk | None:
        """The first lower tier's hit that passes `_problem`, promoted into RAM; a refused chunk is
        a miss."""
        for tier in self.tiers():
            try:
                chunk = read(tier)
                if chunk is not None:
                    kv_shape(chunk)
                    problem = self._problem(chunk, prefix_hash, content_hash)
                    if problem is not None:
                        tier.discard(chunk.prefix_hash)
                        raise ChunkForeignError(f"chunk {chunk.prefix_hash[:16]} from the {tier.name} tier: {problem}")
            except ChunkFormatError as err:
                self._refused(tier.name, err)
                continue
            if chunk is None:
                continue
            self.counts["hits"] += 1
            self.tier_hits[tier.name] += 1
            if self._entry(chunk.prefix_hash) is None:
                self.counts["promotions"] += 1
                return self._insert(self._host_copy(chunk), skip_spill=tier is self.disk).chunk
            return chunk
        self.counts["misses"] += 1
        return None

    def _host_copy(self, chunk: StoredChunk) -> StoredChunk:
        """The chunk as RAM keeps it: under the store's codec (a dense chunk is encoded where it
        lives, e.g. on the GPU), every tensor on the CPU, pinned if `pin_memory`. The store owns
        the tensors afterwards: callers hand over buffers they no longer write to."""
        kv_shape(chunk)
        tensors = chunk.tensors
        if chunk.codec == "dense" and self.codec != "dense":
            tensors = encode_chunk(chunk.tensors["kv"], self.codec)
        codec = self.codec if chunk.codec == "dense" else chunk.codec
        return StoredChunk(chunk.prefix_hash, chunk.content_hash, chunk.token_ids.to("cpu", torch.int64).clone(),
                           chunk.start, {k: self._host(t) for k, t in tensors.items()}, codec, dict(chunk.meta),
                           chunk.namespace, chunk.parent_hash)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` itself if it already is what RAM keeps (a CPU tensor owning its whole storage,
        pinned if the store pins: the write-back path hands over such buffers), else a copy."""
        owned = t.device.type == "cpu" and t.is_contiguous() and (
            t.untyped_storage().nbytes() == t.numel() * t.element_size())
        if owned and (t.is_pinned() or not self.pin_memory):
            return t
        return host_empty(t.shape, t.dtype, pin=self.pin_memory).copy_(t)

    def _insert(self, chunk: StoredChunk, skip_spill: bool = False) -> _Entry:
        """Add `chunk` to RAM, evicting (and spilling) others to fit; a chunk larger than the
        whole budget goes straight to the disk tier."""
        entry = _Entry(chunk, chunk.nbytes(), hits=0, tick=0)
        if entry.nbytes > self.budget_bytes:
            self.counts["rejected"] += 1
            if self.disk is not None and not skip_spill:
                self.disk.write(chunk)
                self.counts["spills"] += 1
            return entry
        while self._bytes + entry.nbytes > self.budget_bytes:
            self._evict_one()
        slot = self._free.pop() if self._free else len(self._slots)
        if slot == len(self._slots):
            self._slots.append(None)
        self._slots[slot] = entry
        self.index.put(chunk.prefix_hash.encode(), slot)
        self._by_content.setdefault(chunk.content_hash, {})[chunk.prefix_hash] = None
        self._bytes += entry.nbytes
        self._touch(entry)
        return entry

    def _remove(self, prefix_hash: str) -> _Entry:
        """Take a chunk out of RAM (its heap items go stale and are skipped)."""
        key = prefix_hash.encode()
        slot = self.index.get(key)
        entry = self._slots[slot]
        self.index.delete(key)
        self._slots[slot] = None
        self._free.append(slot)
        self._bytes -= entry.nbytes
        content = self._by_content.get(entry.chunk.content_hash, {})
        content.pop(entry.chunk.prefix_hash, None)
        if not content:
            self._by_content.pop(entry.chunk.content_hash, None)
        return entry

    def _touch(self, entry: _Entry) -> None:
        self._tick += 1
        self._accesses += 1
        entry.hits, entry.tick = entry.hits + 1, self._tick
        heapq.heappush(self._heap, (entry.hits, entry.tick, entry.chunk.prefix_hash))
        if self._accesses >= AGING_PERIOD * max(len(self.index), 1):
            self._age()

    def _age(self) -> None:
        """Halve every hit count (and rebuild the heap, which also drops its stale items)."""
        self._accesses = 0
        live = [e for e in self._slots if e is not None]
        for entry in live:
            entry.hits = max(entry.hits // 2, 1)
        self._heap = [(e.hits, e.tick, e.chunk.prefix_hash) for e in live]
        heapq.heapify(self._heap)

    def _evict_one(self) -> None:
        while True:
            hits, tick, prefix_hash = heapq.heappop(self._heap)
            entry = self._entry(prefix_hash)
            if entry is not None and (entry.hits, entry.tick) == (hits, tick):
                break
        self._remove(prefix_hash)
        self.counts["evictions"] += 1
        if self.disk is not None and not self.disk.contains(prefix_hash):
            self.disk.write(entry.chunk)
            self.counts["spills"] += 1
