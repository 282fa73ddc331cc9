"""`ChunkWriter`: moving newly computed chunks to the store without delaying the first token.

On a GPU, chunks are encoded on the device and copied, on a side stream, into pinned host
buffers (one per chunk tensor, so the store owns each outright and frees it on eviction). A chunk
is handed to the store once its copy has finished, by a worker thread that waits for the copy
(the wait releases the GIL): admitting a chunk costs ~50 us of Python, 6 ms for a 16K-token
prompt, which used to run at the start of the next request, before its forward was launched
(docs/reuse.md, "A miss"). The next request still admits, without waiting, any finished copy the
worker has not reached, and `flush(wait=True)` admits all. So neither the prefill that computed
the chunks nor the next request's first token waits for them.

Pinning host memory is slow (and may synchronise the device): per request it would cost more
than the prefill. So the first write pins the store's whole budget once, in chunk-sized blocks,
and frees them: torch's caching host allocator keeps them, and later chunk buffers come from it
at no cost, reused as the store evicts. On CPU chunks are stored immediately.

A chunk becomes visible to readers only whole: it is handed to the store after its copy has
finished, as one `put`, and the store admits it only if it has every layer of the model and its
tokens hash to its key (`TieredChunkStore.put`). Chunks carry the store's namespace and their
parent key, so any tier can prove later whose chunk it is. `write` and `flush` may be called from
several threads (the pending list is locked); a chunk is admitted exactly once, by whichever
thread takes it from the list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from ..host_memory import host_empty, pinned_fallbacks
from .chunk import ChunkStore, StoredChunk
from .codecs import encode_chunk

logger = logging.getLogger("kvpatch")


class CopyDone(Protocol):
    """What the writer needs of a copy's completion marker (a `torch.cuda.Event`)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


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
        self._pending: list[tuple[CopyDone, list[StoredChunk]]] = []
        self._stream: torch.cuda.Stream | None = None
        self._prewarmed = False
        self._changed = threading.Condition()
        self._admitting = 0  # batches taken from _pending, not yet in the store
        self._worker: threading.Thread | None = None
        self._error: Exception | None = None

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
        stream = self._copy_stream(device)
        if not self._prewarmed:
            self._prewarmed = True
            self._prewarm(max(encoded, key=lambda t: sum(x.numel() for x in t.values())))
        stream.wait_stream(torch.cuda.current_stream(device))
        stored = []
        with torch.cuda.stream(stream):
            for c, tensors in zip(chunks, encoded):
                host = {}
                for name, t in tensors.items():
                    host[name] = host_empty(t.shape, t.dtype, pin=True)
                    host[name].copy_(t, non_blocking=True)
                    t.record_stream(stream)
                stored.append(self._stored(c, host, codec))
            event = torch.cuda.Event()
            event.record(stream)
        self.submit(event, stored)

    @contextmanager
    def off_the_compute_stream(self, sources: Iterable[torch.Tensor]) -> Iterator[None]:
        """Run the block (cutting chunks out of `sources`, encoding them, `write`) on the copy
        stream, after the work queued so far: the compute stream, which the first token waits
        for, never waits for it. `sources` are recorded on the copy stream so that their memory
        is not reused before the block's kernels have read them. On CPU the block just runs."""
        sources = [t for t in sources if t.is_cuda]
        if not sources:
            yield
            return
        stream = self._copy_stream(sources[0].device)
        stream.wait_stream(torch.cuda.current_stream(sources[0].device))
        for t in sources:
            t.record_stream(stream)
        with torch.cuda.stream(stream):
            yield

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def submit(self, done: CopyDone, chunks: list[StoredChunk]) -> None:
        """Admit `chunks` to the store once `done` says their host copies have finished."""
        with self._changed:
            self._pending.append((done, chunks))
            if self._worker is None:
                self._worker = threading.Thread(target=self._admit_in_background, name="kvpatch-chunk-writer",
                                                daemon=True)
                self._worker.start()

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
        """Admit every finished copy now; with `wait`, wait for all and admit them (re-raising an
        error the worker met)."""
        while True:
            with self._changed:
                ready = bool(self._pending) and (wait or self._pending[0][0].query())
                batch = self._take() if ready else None
            if batch is None:
                break
            self._admit(*batch)
        if wait:
            with self._changed:
                self._changed.wait_for(lambda: not self._pending and not self._admitting)
                error, self._error = self._error, None
            if error is not None:
                raise error

    def _take(self) -> tuple[CopyDone, list[StoredChunk]]:
        """The oldest pending batch, now this thread's to admit (call under the lock)."""
        self._admitting += 1
        return self._pending.pop(0)

    def _admit(self, done: CopyDone, chunks: list[StoredChunk]) -> None:
        try:
            done.synchronize()
            for chunk in chunks:
                self.store.put(chunk)
        except Exception as err:  # noqa: BLE001  (kept for flush(wait=True); the chunks are misses)
            logger.warning("kvpatch: writing %d chunks back failed: %s: %s", len(chunks), type(err).__name__, err)
            with self._changed:
                self._error = self._error or err
        finally:
            with self._changed:
                self._admitting -= 1
                self._changed.notify_all()

    def _admit_in_background(self) -> None:
        """The worker: admit pending batches oldest first, exit when none is left."""
        while True:
            with self._changed:
                if not self._pending:
                    self._worker = None
                    return
                batch = self._take()
            self._admit(*batch)
