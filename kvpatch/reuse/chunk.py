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
#: 2: the header binds the chunk to its model namespace and parent key (`namespace`, `parent_hash`).
CHUNK_FORMAT_VERSION = 2
#: Largest sealed chunk any tier reads, whatever its budget (no chunk of a real model comes near).
MAX_CHUNK_BYTES = 4 * 2**30


class ChunkFormatError(KVPatchError):
    """Bytes that do not decode to a chunk of the expected format (damaged, truncated, old)."""

    #: The store counter a refusal of this kind increments (`TieredChunkStore.stats()`).
    reason = "corrupt"


class ChunkForeignError(ChunkFormatError):
    """An intact chunk that is not the one asked for: another key, model namespace, tokens or
    shape (a file copied over another, a value from another model). Never used."""

    reason = "foreign"


class ChunkAuthError(ChunkFormatError):
    """A chunk from a shared tier without a valid HMAC: written by someone without the secret."""

    reason = "unauthenticated"


class StoreUnavailableWarning(RuntimeWarning):
    """A chunk store tier cannot be used (Redis unreachable, disk full or read-only): its lookups
    are misses, or its writes are dropped, until it is back; generation goes on."""


@dataclass
class StoredChunk:
    """K/V of `token_ids` (one chunk) computed at positions `start .. start+len-1`.

    `prefix_hash` keys the chunk together with everything before it (exact reuse);
    `content_hash` keys its tokens alone (approximate reuse, at another position or history).
    `namespace` (the hasher's namespace: model fingerprint and codec) and `parent_hash` (the key
    of the chunk before it, or the namespace for the first) let a reader prove that the chunk's
    token ids hash to its key under its own model (`ChunkHasher.binding_problem`); "" when unknown
    (chunks built by hand: a store bound to a hasher refuses them).
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
    namespace: str = ""
    parent_hash: str = ""

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
            "namespace": self.namespace,
            "parent_hash": self.parent_hash,
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
            raise ChunkFormatError(f"{where}: field 'version': expected {CHUNK_FORMAT_VERSION}, found "
                                   f"{header.get('version')!r} (chunks of other versions are not read: they are "
                                   "misses, recomputed and rewritten)")
        fields = ("prefix_hash", "content_hash", "start", "codec", "meta", "namespace", "parent_hash")
        missing = [k for k in fields if k not in header]
        if missing or "token_ids" not in tensors:
            raise ChunkFormatError(f"{where}: missing fields {missing or ['token_ids']}")
        payload = {k.removeprefix("payload."): v for k, v in tensors.items() if k.startswith("payload.")}
        try:
            start, meta = int(header["start"]), json.loads(header["meta"])
        except (ValueError, RecursionError):
            raise ChunkFormatError(f"{where}: fields 'start' and 'meta' must be an integer and JSON") from None
        if start < 0 or not isinstance(meta, dict) or tensors["token_ids"].dtype != torch.int64:
            raise ChunkFormatError(f"{where}: expected start >= 0, a JSON object as meta and int64 token_ids")
        return cls(
            prefix_hash=header["prefix_hash"], content_hash=header["content_hash"],
            token_ids=tensors["token_ids"], start=start, tensors=payload, codec=header["codec"], meta=meta,
            namespace=header["namespace"], parent_hash=header["parent_hash"],
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
    `get` returns chunks whose `kv` can be produced by `dense_kv`. `bind` ties the store to the
    hasher and model shapes of its reader, so it can refuse chunks that are not theirs; `namespace`
    is the bound hasher's namespace ("" while unbound), which writers stamp on new chunks."""

    namespace: str

    def bind(self, hasher: Any, shapes: Any) -> None: ...
    def contains(self, prefix_hash: str) -> bool: ...
    def get(self, prefix_hash: str) -> StoredChunk | None: ...
    def get_by_content(self, content_hash: str) -> StoredChunk | None: ...
    def put(self, chunk: StoredChunk) -> bool: ...
    def stats(self) -> dict[str, Any]: ...
