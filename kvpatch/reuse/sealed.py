"""Sealed chunk bytes: what the disk tier and Redis keep, so damage, misplacement and forgery are
refused, never loaded.

`StoredChunk.to_bytes` output plus `__metadata__` strings:

- `kvpatch.chunk.sha256`: SHA-256 of the rest of the header (canonical JSON) and the whole tensor
  data section. Proves integrity (a torn write or a flipped byte), not origin: anyone can compute it.
- `kvpatch.chunk.hmac` (when the tier has a secret): HMAC-SHA256, under the secret, of the key the
  value is stored under and that SHA-256. Proves the value was sealed by a holder of the secret for
  this key; compared with `hmac.compare_digest`. (MAC of the digest: the digest already covers
  every byte, so the data is hashed once.)

The result is still a valid chunk (`StoredChunk.from_bytes` reads it; safetensors ignores extra
keys). `unseal` checks, in order: structure (the snapshot reader's own header parser), checksum
(ChunkFormatError), that the value is the chunk of the key asked for (ChunkForeignError), and the
HMAC when a secret is given (ChunkAuthError).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from ..errors import ConfigError, SnapshotCorruptError
from ..files.safetensors_io import header_bytes, parse_header
from ..stage_specs.store_memory import secret_problem
from .chunk import ChunkAuthError, ChunkForeignError, ChunkFormatError, StoredChunk

SEAL_KEY = "kvpatch.chunk.sha256"
MAC_KEY = "kvpatch.chunk.hmac"
#: Where a chunk secret comes from when the config does not give one.
SECRET_ENV = "KVPATCH_CHUNK_SECRET"


def resolve_secret(configured: str | bytes | None, field: str) -> bytes | None:
    """The chunk secret: `configured` (a config param), else `$KVPATCH_CHUNK_SECRET`, else None.
    ConfigError naming `field` (or the variable) if it is too short (`secret_problem`)."""
    source, value = field, configured
    if value is None:
        source, value = SECRET_ENV, os.environ.get(SECRET_ENV) or None
    if value is None:
        return None
    secret = value.encode() if isinstance(value, str) else bytes(value)
    problem = secret_problem(secret)
    if problem is not None:
        raise ConfigError(f"{source}: {problem}, got {len(secret)}")
    return secret


def seal(chunk: StoredChunk, secret: bytes | None = None) -> bytes:
    """`chunk.to_bytes()` with the checksum (and, given `secret`, the HMAC for its key) added to
    its header; the data section is unchanged."""
    data = chunk.to_bytes()
    metadata, entries, start = parse_header(data, "chunk bytes")
    body = memoryview(data)[start:]
    digest = _digest(metadata, entries, body)
    metadata[SEAL_KEY] = digest
    if secret is not None:
        metadata[MAC_KEY] = _mac(secret, chunk.prefix_hash, digest)
    return header_bytes(metadata, entries) + body


def unseal(data: bytes | memoryview, where: str, key: str | None = None, secret: bytes | None = None) -> StoredChunk:
    """The chunk in sealed bytes, checked as the module docstring says. `key`: the key it was
    read under (its header must name it); `secret`: require a valid HMAC under it."""
    try:
        metadata, entries, start = parse_header(data, where)
    except SnapshotCorruptError as err:
        raise ChunkFormatError(str(err)) from None
    expected = metadata.pop(SEAL_KEY, None)
    mac = metadata.pop(MAC_KEY, None)
    if expected is None:
        raise ChunkFormatError(f"{where}: no {SEAL_KEY!r} in the header (not written by a kvpatch chunk store)")
    digest = _digest(metadata, entries, memoryview(data)[start:])
    if not hmac.compare_digest(digest, expected):
        raise ChunkFormatError(f"{where}: checksum mismatch: the chunk was modified or damaged")
    if key is not None and metadata.get("prefix_hash") != key:
        raise ChunkForeignError(f"{where}: holds the chunk of key {str(metadata.get('prefix_hash'))[:16]!r}, "
                                f"not of {key[:16]!r} (copied from another key)")
    if secret is not None:
        if mac is None:
            raise ChunkAuthError(f"{where}: no {MAC_KEY!r}: written without the chunk secret")
        if not hmac.compare_digest(mac, _mac(secret, metadata.get("prefix_hash", ""), digest)):
            raise ChunkAuthError(f"{where}: HMAC mismatch: not sealed with this store's secret")
    return StoredChunk.from_bytes(bytes(data), where)


def _mac(secret: bytes, key: str, digest: str) -> str:
    message = b"kvpatch-chunk-hmac\0" + key.encode() + b"\0" + digest.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _digest(metadata: dict[str, str], entries: dict[str, dict], body: memoryview) -> str:
    """SHA-256 of the whole header (metadata and tensor entries: names, dtypes, shapes, offsets;
    canonical JSON) and the data section."""
    header = {"__metadata__": metadata, **entries}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()
