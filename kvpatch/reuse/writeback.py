"""`ChunkWriter`: moving newly computed chunks to the store without delaying the first token.

On a GPU, the chunks of one prefill are encoded on the device and copied, on a side stream, into
ONE pinned host allocation per dtype (a pinned allocation is slow and may synchronise the device,
so one per chunk would cost more than the prefill). A chunk is handed to the store once its copy
has finished: checked at the next request without waiting, or on `flush(wait=True)`. So the
prefill that computed the chunks returns at once. On CPU chunks are stored immediately.
The store keeps views into the shared allocation; it is freed when the last of them goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunk import ChunkStore, StoredChunk
from .codecs import encode_chunk


@dataclass
class NewChunk:
    prefix_hash: str
    content_hash: str
    token_ids: torch.Tensor
    start: int
    kv: torch.Tensor  # [L, 2, H, T, D], any device, may be a view


class ChunkWriter:
    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self._pending: list[tuple[torch.cuda.Event, list[StoredChunk]]] = []
        self._stream: torch.cuda.Stream | None = None

    def write(self, chunks: list[NewChunk], codec: str) -> None:
        """Store `chunks`, each encoded with `codec`."""
        if not chunks:
            return
        encoded = [encode_chunk(c.kv, codec) for c in chunks]
        if not chunks[0].kv.is_cuda:
            for c, tensors in zip(chunks, encoded):
                self.store.put(StoredChunk(c.prefix_hash, c.content_hash, c.token_ids, c.start,
                                           {k: v.contiguous() for k, v in tensors.items()}, codec))
            return
        device = chunks[0].kv.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        sizes: dict[torch.dtype, int] = {}
        for tensors in encoded:
            for t in tensors.values():
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        pools = {dtype: torch.empty(n, dtype=dtype, pin_memory=True) for dtype, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        stored = []
        with torch.cuda.stream(self._stream):
            for c, tensors in zip(chunks, encoded):
                host = {}
                for name, t in tensors.items():
                    start = offsets[t.dtype]
                    view = pools[t.dtype][start : start + t.numel()].view(t.shape)
                    view.copy_(t, non_blocking=True)
                    t.record_stream(self._stream)
                    offsets[t.dtype] = start + t.numel()
                    host[name] = view
                stored.append(StoredChunk(c.prefix_hash, c.content_hash, c.token_ids, c.start, host, codec))
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending.append((event, stored))

    def flush(self, wait: bool = True) -> None:
        """Hand finished copies to the store (all of them, waiting, when `wait`)."""
        still = []
        for event, chunks in self._pending:
            if wait:
                event.synchronize()
            if wait or event.query():
                for chunk in chunks:
                    self.store.put(chunk)
            else:
                still.append((event, chunks))
        self._pending = still
