"""`StoredChunk`: the K/V of one chunk of tokens for every layer, the unit every chunk store keeps.

One contiguous tensor per chunk (`kv`, shape `[layers, 2, kv_heads, tokens, head_dim]`) so that
bringing a chunk to the GPU is one copy, whatever the number of layers. Stores may keep a
compressed form instead (`codec` != "dense"); `ChunkCodec` turns it back into `kv`.
Chunks travel between processes (disk tier, Redis, snapshots) as safetensors bytes with JSON
metadata: never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..errors import KVPatchError

#: Version of the byte format written by `StoredChunk.to_bytes`; readers refuse other versions.
CHUNK_FORMAT_VERSION = 1


class ChunkFormatError(KVPatchError):
    """Bytes that do not decode to a chunk of the expected format."""


@dataclass
class StoredChunk:
    """K/V of `token_ids` (one chunk) computed at positions `start .. start+len-1`.

    `prefix_hash` keys the chunk together with everything before it (exact reuse);
    `content_hash` keys its tokens alone (approximate reuse, at another position or history).
    `tensors` holds the payload: {"kv": [L, 2, H, T, D]} for codec "dense", or whatever the
    codec named by `codec` needs.
    """

    prefix_hash: str
    content_hash: str
    token_ids: torch.Tensor  # int64 [T], on CPU
    start: int
    tensors: dict[str, torch.Tensor]
    codec: str = "dense"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def nbytes(self) -> int:
        """Bytes the payload occupies (what store budgets count)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        """safetensors bytes of payload + token ids, metadata as JSON strings."""
        tensors = {f"payload.{k}": v.contiguous().cpu() for k, v in self.tensors.items()}
        tensors["token_ids"] = self.token_ids.to(torch.int64).contiguous().cpu()
        header = {
            "format": "kvpatch-chunk",
            "version": str(CHUNK_FORMAT_VERSION),
            "prefix_hash": self.prefix_hash,
            "content_hash": self.content_hash,
            "start": str(self.start),
            "codec": self.codec,
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        return safetensors_save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<bytes>") -> StoredChunk:
        """Decode `to_bytes` output; ChunkFormatError (naming `where`) for anything else."""
        try:
            tensors = safetensors_load(data)
            header = _safetensors_metadata(data)
        except Exception as err:  # noqa: BLE001  (safetensors raises several types for corrupt input)
            raise ChunkFormatError(f"{where}: not a kvpatch chunk (safetensors decode failed: {err})") from None
        if header.get("format") != "kvpatch-chunk":
            raise ChunkFormatError(f"{where}: field 'format': expected 'kvpatch-chunk', found {header.get('format')!r}")
        if header.get("version") != str(CHUNK_FORMAT_VERSION):
            raise ChunkFormatError(f"{where}: field 'version': expected {CHUNK_FORMAT_VERSION}, found {header.get('version')!r}")
        missing = [k for k in ("prefix_hash", "content_hash", "start", "codec", "meta") if k not in header]
        if missing or "token_ids" not in tensors:
            raise ChunkFormatError(f"{where}: missing fields {missing or ['token_ids']}")
        payload = {k.removeprefix("payload."): v for k, v in tensors.items() if k.startswith("payload.")}
        return cls(
            prefix_hash=header["prefix_hash"], content_hash=header["content_hash"],
            token_ids=tensors["token_ids"], start=int(header["start"]), tensors=payload,
            codec=header["codec"], meta=json.loads(header["meta"]),
        )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (safetensors.torch.load drops it)."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8:
        raise ValueError("bad header length")
    return dict(json.loads(data[8 : 8 + n]).get("__metadata__", {}))


class ChunkStore(Protocol):
    """What the reuse pipeline needs from a chunk store stage (RAM, disk tier, Redis).

    Keys are the hex hashes of `StoredChunk`. `get`/`get_by_content` count hits and misses and may
    promote a chunk from a slower tier; `contains` has no side effects (used while matching).
    `get` returns chunks whose `kv` can be produced by `dense_kv`."""

    def contains(self, prefix_hash: str) -> bool: ...
    def get(self, prefix_hash: str) -> StoredChunk | None: ...
    def get_by_content(self, content_hash: str) -> StoredChunk | None: ...
    def put(self, chunk: StoredChunk) -> None: ...
    def stats(self) -> dict[str, Any]: ...
