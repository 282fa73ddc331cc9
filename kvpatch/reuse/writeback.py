"""`ChunkWriter`: moving newly computed chunks to the store without delaying the first token.

On a GPU the device-to-host copies go to pinned buffers on a side stream; a chunk is handed to
the store once its copy has finished (checked at the next request, or on `flush(wait=True)`),
so the prefill that computed it returns at once. On CPU chunks are stored immediately.
"""

from __future__ import annotations

import torch

from .chunk import ChunkStore, StoredChunk
from .codecs import encode_chunk


class ChunkWriter:
    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self._pending: list[tuple[torch.cuda.Event, StoredChunk]] = []
        self._stream: torch.cuda.Stream | None = None

    def write(self, prefix_hash: str, content_hash: str, token_ids: torch.Tensor, start: int,
              kv: torch.Tensor, codec: str) -> None:
        """Store `kv` ([L, 2, H, T, D], any device) as a chunk, encoded with `codec`."""
        tensors = encode_chunk(kv, codec)
        if not kv.is_cuda:
            self.store.put(StoredChunk(prefix_hash, content_hash, token_ids, start,
                                       {k: v.contiguous() for k, v in tensors.items()}, codec))
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=kv.device)
        self._stream.wait_stream(torch.cuda.current_stream(kv.device))
        host: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(self._stream):
            for name, tensor in tensors.items():
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                buffer.copy_(tensor, non_blocking=True)
                tensor.record_stream(self._stream)
                host[name] = buffer
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending.append((event, StoredChunk(prefix_hash, content_hash, token_ids, start, host, codec)))

    def flush(self, wait: bool = True) -> None:
        """Hand finished copies to the store (all of them, waiting, when `wait`)."""
        still = []
        for event, chunk in self._pending:
            if wait:
                event.synchronize()
            if wait or event.query():
                self.store.put(chunk)
            else:
                still.append((event, chunk))
        self._pending = still
