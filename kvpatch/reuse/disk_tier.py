"""The disk tier of a chunk store: one sealed safetensors file per chunk in a directory.

The directory is the source of truth, so several processes can share it: a file is named after
its prefix hash (`{prefix_hash}.safetensors`, or a digest of it for keys that are not safe file
names), written atomically (`snapshot.io.atomic_file`: unique temp file, fsync, rename; the last
writer of a key wins and both wrote the same K/V), and its modification time is its recency: a
hit touches it, and eviction (over `budget_bytes`) removes the least recently used files after
re-reading the directory, so files other processes wrote count too. A damaged file is refused
with ChunkFormatError (`sealed.unseal`), never loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import SnapshotError
from ..snapshot.directory import gc
from ..snapshot.io import SUFFIX, read_header, write_bytes_atomic
from .chunk import ChunkFormatError, StoredChunk
from .sealed import seal, unseal

_SAFE_NAME = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,199}")


def chunk_file_name(prefix_hash: str) -> str:
    """The file a chunk lives in: its key if that is a safe file name, else a digest of it."""
    stem = prefix_hash if _SAFE_NAME.fullmatch(prefix_hash) else "sha256-" + hashlib.sha256(prefix_hash.encode()).hexdigest()
    return stem + SUFFIX


class DiskTier:
    """Chunk files in `directory` within `budget_bytes` (least recently used files go first)."""

    name = "disk"

    def __init__(self, directory: str | os.PathLike[str], budget_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.evictions = 0
        gc(self.directory)  # temp files of writers that died
        #: content hash -> prefix hash of the files this process knows (read at open, then kept up).
        self._by_content: dict[str, str] = {}
        self._bytes = 0
        for path, size, _ in self._scan():
            self._bytes += size
            try:
                metadata, _ = read_header(path)
            except SnapshotError:
                continue  # refused (and removed) when someone asks for it
            if "prefix_hash" in metadata and "content_hash" in metadata:
                self._by_content[metadata["content_hash"]] = metadata["prefix_hash"]

    def path(self, prefix_hash: str) -> Path:
        return self.directory / chunk_file_name(prefix_hash)

    def contains(self, prefix_hash: str) -> bool:
        return self.path(prefix_hash).is_file()

    def read(self, prefix_hash: str) -> StoredChunk | None:
        """The chunk, or None if no file holds it. A damaged file is removed (so it costs one
        failure, not one per lookup) and refused with ChunkFormatError."""
        path = self.path(prefix_hash)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            chunk = unseal(data, f"chunk file {path}")
        except ChunkFormatError as err:
            self.remove(prefix_hash)
            raise ChunkFormatError(f"{err}; refused and removed") from None
        _touch(path)
        return chunk

    def read_by_content(self, content_hash: str) -> StoredChunk | None:
        prefix_hash = self._by_content.get(content_hash)
        chunk = self.read(prefix_hash) if prefix_hash is not None else None
        if chunk is None:
            self._by_content.pop(content_hash, None)  # evicted meanwhile
        return chunk

    def write(self, chunk: StoredChunk) -> None:
        """Write (or replace) the chunk's file, then evict down to the budget."""
        data = seal(chunk)
        if len(data) > self.budget_bytes:
            return
        path = self.path(chunk.prefix_hash)
        existing = path.stat().st_size if path.exists() else 0
        write_bytes_atomic(path, data)
        self._by_content[chunk.content_hash] = chunk.prefix_hash
        self._bytes += len(data) - existing
        if self._bytes > self.budget_bytes:
            self._evict()

    def remove(self, prefix_hash: str) -> None:
        path = self.path(prefix_hash)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self._bytes -= size

    def prefix_hashes(self) -> list[str]:
        """Keys of every chunk file now in the directory (from their headers)."""
        keys = []
        for path, _, _ in self._scan():
            try:
                keys.append(read_header(path)[0]["prefix_hash"])
            except (SnapshotError, KeyError):
                continue
        return keys

    def iter_chunks(self) -> Iterator[StoredChunk]:
        """Every readable chunk of the directory (damaged files are skipped and removed)."""
        for prefix_hash in self.prefix_hashes():
            try:
                chunk = self.read(prefix_hash)
            except ChunkFormatError:
                continue
            if chunk is not None:
                yield chunk

    def stats(self) -> dict[str, Any]:
        return {"bytes": self._bytes, "evictions": self.evictions, "budget_bytes": self.budget_bytes}

    def _evict(self) -> None:
        """Re-read the directory (other processes write to it too) and remove the least recently
        used files until the total fits the budget."""
        files = sorted(self._scan(), key=lambda f: (f[2], f[0].name))
        self._bytes = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if self._bytes <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)
            self._bytes -= size
            self.evictions += 1

    def _scan(self) -> list[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of every chunk file (never temp files)."""
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    found.append((Path(entry.path), stat.st_size, stat.st_mtime_ns))
        return found


def _touch(path: Path) -> None:
    """Mark a file recently used (its mtime is the LRU order every process shares)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass
