"""Checksummed chunk bytes: what the disk tier and Redis keep, so damage is refused, never loaded.

`StoredChunk.to_bytes` output plus one more `__metadata__` string, `kvpatch.chunk.sha256`: the
SHA-256 of the rest of the header (canonical JSON) and the whole tensor data section. The result is
still a valid chunk (`StoredChunk.from_bytes` reads it; safetensors ignores the extra key), but
`unseal` first checks the header structure (the snapshot reader's own parser: truncation is
caught there) and then the checksum, so a torn write or a flipped byte raises ChunkFormatError.
"""

from __future__ import annotations

import hashlib
import json

from ..errors import SnapshotCorruptError
from ..snapshot.io import header_bytes, parse_header
from .chunk import ChunkFormatError, StoredChunk

SEAL_KEY = "kvpatch.chunk.sha256"


def seal(chunk: StoredChunk) -> bytes:
    """`chunk.to_bytes()` with the checksum added to its header (the data section is unchanged)."""
    data = chunk.to_bytes()
    metadata, entries, start = parse_header(data, "chunk bytes")
    body = memoryview(data)[start:]
    metadata[SEAL_KEY] = _digest(metadata, entries, body)
    return header_bytes(metadata, entries) + body


def unseal(data: bytes | memoryview, where: str) -> StoredChunk:
    """The chunk in sealed bytes, or ChunkFormatError naming `where` and what is wrong."""
    try:
        metadata, entries, start = parse_header(data, where)
    except SnapshotCorruptError as err:
        raise ChunkFormatError(str(err)) from None
    expected = metadata.pop(SEAL_KEY, None)
    if expected is None:
        raise ChunkFormatError(f"{where}: no {SEAL_KEY!r} in the header (not written by a kvpatch chunk store)")
    if _digest(metadata, entries, memoryview(data)[start:]) != expected:
        raise ChunkFormatError(f"{where}: checksum mismatch: the chunk was modified or damaged")
    return StoredChunk.from_bytes(bytes(data), where)


def _digest(metadata: dict[str, str], entries: dict[str, dict], body: memoryview) -> str:
    """SHA-256 of the whole header (metadata and tensor entries: names, dtypes, shapes, offsets;
    canonical JSON) and the data section."""
    header = {"__metadata__": metadata, **entries}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()
