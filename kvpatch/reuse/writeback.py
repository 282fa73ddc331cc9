"""`ChunkWriter`: moving newly computed chunks to the store without delaying the first token.

On a GPU, chunks are encoded on the device and copied, on a side stream, into pinned host
buffers (one per chunk tensor, so the store owns each outright and frees it on eviction). A chunk
is handed to the store once its copy has finished: checked at the next request without waiting,
or on `flush(wait=True)`. So the prefill that computed the chunks returns at once.

Pinning host memory is slow (and may synchronise the device): per request it would cost more
than the prefill. So the first write pins the store's whole budget once, in chunk-sized blocks,
and frees them: torch's caching host allocator keeps them, and later chunk buffers come from it
at no cost, reused as the store evicts. On CPU chunks are stored immediately.

A chunk becomes visible to readers only whole: it is handed to the store after its copy has
finished, as one `put`, and the store admits it only if it has every layer of the model and its
tokens hash to its key (`TieredChunkStore.put`). Chunks carry the store's namespace and their
parent key, so any tier can prove later whose chunk it is. `write` and `flush` may be called from
several threads (the pending list is locked).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..host_memory import host_empty, pinned_fallbacks
from .chunk import ChunkStore, StoredChunk
from .codecs import encode_chunk


@dataclass
class NewChunk:
    prefix_hash: str
    content_hash: str
    token_ids: torch.Tensor
    start: int
    kv: torch.Tensor  # [L, 2, H, T, D], any device, owned by the chunk (not a view of the cache)
    #: Key of the chunk before this one in its prompt (the hasher's namespace for the first).
    parent_hash: str = ""


class ChunkWriter:
    def __init__(self, store: ChunkStore, prewarm_bytes: int = 0) -> None:
        self.store = store
        #: Host memory pinned up front at the first GPU write (normally the store's RAM budget).
        self.prewarm_bytes = prewarm_bytes
        self._pending: list[tuple[torch.cuda.Event, list[StoredChunk]]] = []
        self._stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()

    def write(self, chunks: list[NewChunk], codec: str) -> None:
        """Store `chunks`, each encoded with `codec`."""
        if not chunks:
            return
        encoded = [encode_chunk(c.kv, codec) for c in chunks]
        if not chunks[0].kv.is_cuda:
            for c, tensors in zip(chunks, encoded):
                self.store.put(self._stored(c, tensors, codec))
            return
        device = chunks[0].kv.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
            self._prewarm(max(encoded, key=lambda t: sum(x.numel() for x in t.values())))
        self._stream.wait_stream(torch.cuda.current_stream(device))
        stored = []
        with torch.cuda.stream(self._stream):
            for c, tensors in zip(chunks, encoded):
                host = {}
                for name, t in tensors.items():
                    host[name] = host_empty(t.shape, t.dtype, pin=True)
                    host[name].copy_(t, non_blocking=True)
                    t.record_stream(self._stream)
                stored.append(self._stored(c, host, codec))
            event = torch.cuda.Event()
            event.record(self._stream)
        with self._lock:
            self._pending.append((event, stored))

    def _stored(self, chunk: NewChunk, tensors: dict[str, torch.Tensor], codec: str) -> StoredChunk:
        return StoredChunk(chunk.prefix_hash, chunk.content_hash, chunk.token_ids, chunk.start, tensors, codec,
                           namespace=self.store.namespace, parent_hash=chunk.parent_hash)

    def _prewarm(self, tensors: dict[str, torch.Tensor]) -> None:
        """Pin `prewarm_bytes` of chunk-shaped host buffers once and release them to torch's
        caching host allocator."""
        chunk_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        count = self.prewarm_bytes // max(chunk_bytes, 1)
        fallbacks, blocks = pinned_fallbacks(), []
        for _ in range(count):
            blocks += [host_empty(t.shape, t.dtype, pin=True) for t in tensors.values()]
            if pinned_fallbacks() > fallbacks:  # the host is out of page-locked memory: stop asking
                break
        del blocks

    def flush(self, wait: bool = True) -> None:
        """Hand finished copies to the store (all of them, waiting, when `wait`)."""
        with self._lock:
            pending, self._pending = self._pending, []
        ready, still = [], []
        for event, chunks in pending:
            if wait:
                event.synchronize()
            (ready if wait or event.query() else still).append((event, chunks))
        with self._lock:
            self._pending = still + self._pending
        for _, chunks in ready:
            for chunk in chunks:
                self.store.put(chunk)
