"""The disk tier of a chunk store: one sealed safetensors file per chunk in a directory of its own.

The tier owns only `<path>/kvpatch-chunks-v<format>/` (created mode 0700) and, in it, only names it
writes: `<64 hex>.safetensors` (`chunk_file_name`), their writers' temp files and its lock file
(LOCK_NAME). Anything else
under the path (other files, directories, symlinks, FIFOs, devices) is never opened, never
counted and never deleted; entries are classified with `lstat` and files are read through
`files.safetensors_io.read_regular` (no symlinks followed, non-blocking open, size capped at the budget).

The directory is the source of truth, so several processes can share it: a file is written
atomically (`files.atomic.atomic_file`: unique temp file, fsync, rename; the last writer of a key
wins and both wrote the same K/V), and its modification time is its recency: a hit touches it, and
eviction (over `budget_bytes`) removes the least recently used files after re-reading the
directory, so files other processes wrote count too. Writers of one folder take turns under an
advisory lock (`flock` on LOCK_NAME, which also holds a write generation): a writer that finds the
generation moved since its own last write (another process wrote) recounts the folder before
adding its file, so the budget holds across processes after every write. A damaged file, or one holding another key's
chunk, is refused (`sealed.unseal`) and removed, never loaded.

Authentication: with a secret (the `secret` argument or `$KVPATCH_CHUNK_SECRET`) every file carries
an HMAC and files without a valid one are refused. Without a secret the tier is private to its
user: its folder must be owned by this user and not writable by group or others, else ConfigError
(anyone else who can write there could plant K/V that steer this user's outputs).

A disk that is full or read-only never fails a request: the write is dropped, counted
(`write_errors`), and one StoreUnavailableWarning is issued until a write succeeds again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SnapshotError
from ..files.folders import is_stale_temp, list_temp_files, regular_files
from ..files.atomic import write_bytes_atomic
from ..files.safetensors_io import SUFFIX, NotRegularFileError, read_header, read_regular, temp_writer
from .chunk import CHUNK_FORMAT_VERSION, MAX_CHUNK_BYTES, ChunkForeignError, ChunkFormatError, StoredChunk, StoreUnavailableWarning
from .sealed import SECRET_ENV, resolve_secret, seal, unseal

#: The tier's own folder under the configured path (a new format gets a new folder).
SUBDIR = f"kvpatch-chunks-v{CHUNK_FORMAT_VERSION}"
#: The folder's lock file: `flock`ed around every write; its 8 bytes count writes (a generation).
LOCK_NAME = ".kvpatch-tier.lock"
#: The only chunk file names the tier writes, reads, counts or deletes.
FILE_NAME = re.compile(r"[0-9a-f]{64}" + re.escape(SUFFIX))
_HEX64 = re.compile(r"[0-9a-f]{64}")


def chunk_file_name(prefix_hash: str) -> str:
    """The file a chunk lives in: its key if that is 64 lowercase hex digits, else their SHA-256."""
    stem = prefix_hash if _HEX64.fullmatch(prefix_hash) else hashlib.sha256(prefix_hash.encode()).hexdigest()
    return stem + SUFFIX


class DiskTier:
    """Chunk files in `directory`/SUBDIR within `budget_bytes` (least recently used files go first)."""

    name = "disk"

    def __init__(self, directory: str | os.PathLike[str], budget_bytes: int, secret: str | bytes | None = None) -> None:
        self.root = Path(directory)
        self.directory = self.root / SUBDIR
        self.budget_bytes = int(budget_bytes)
        self.secret = resolve_secret(secret, "disk.secret")
        self.evictions = self.write_errors = 0
        self._failing = False  # a write failed and no write has succeeded since (one warning)
        self._lock = threading.Lock()
        #: content hash -> prefix hash of the files this process knows (read at open, then kept up).
        self._by_content: dict[str, str] = {}
        #: file name -> the content hash it was indexed under, so a removed file leaves the index too.
        self._content_of: dict[str, str] = {}
        self._bytes = 0
        self._generation: int | None = None  # the lock file's count after this tier's last write
        if self._prepare():
            self._collect_temps()
            for path, size, _ in self._scan():
                self._bytes += size
                keys = _keys(path)
                if keys is not None:
                    self._index(path.name, keys[0], keys[1])

    def path(self, prefix_hash: str) -> Path:
        return self.directory / chunk_file_name(prefix_hash)

    def contains(self, prefix_hash: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path(prefix_hash)).st_mode)
        except OSError:
            return False

    def read(self, prefix_hash: str) -> StoredChunk | None:
        """The chunk, or None if no regular file holds it. A file that is damaged, holds another
        key's chunk or fails the HMAC is removed (it costs one failure, not one per lookup) and
        refused with a ChunkFormatError subclass; a non-regular entry is refused and left alone."""
        path = self.path(prefix_hash)
        if not os.path.lexists(path):
            return None
        try:
            data = read_regular(path, "chunk file", self._max_bytes(), follow_symlinks=False)
        except NotRegularFileError as err:
            raise ChunkForeignError(f"{err}; left alone") from None
        except SnapshotError as err:
            if not os.path.lexists(path):
                return None  # evicted meanwhile
            self.remove(prefix_hash)
            raise ChunkFormatError(f"{err}; refused and removed") from None
        try:
            chunk = unseal(data, f"chunk file {path}", key=prefix_hash, secret=self.secret)
        except ChunkFormatError as err:
            self.remove(prefix_hash)
            raise type(err)(f"{err}; refused and removed") from None
        _touch(path)
        return chunk

    def read_by_content(self, content_hash: str) -> StoredChunk | None:
        prefix_hash = self._by_content.get(content_hash)
        chunk = self.read(prefix_hash) if prefix_hash is not None else None
        if chunk is None:
            self._by_content.pop(content_hash, None)  # evicted meanwhile
        return chunk

    def write(self, chunk: StoredChunk) -> None:
        """Write (or replace) the chunk's file, then evict down to the budget. A failed write
        (disk full, read-only) is dropped: counted, one warning per outage, never raised."""
        data = seal(chunk, self.secret)
        if len(data) > self.budget_bytes:
            return
        path = self.path(chunk.prefix_hash)
        try:
            with self._lock, self._folder_turn():
                existing = _regular_size(path)
                write_bytes_atomic(path, data)
                self._index(path.name, chunk.prefix_hash, chunk.content_hash)
                self._bytes += len(data) - existing
                if self._bytes > self.budget_bytes:
                    self._evict()
        except OSError as err:
            self._write_failed(err)
            return
        self._failing = False

    def remove(self, prefix_hash: str) -> None:
        """Delete the key's file if it is a regular file (this tier's name in its own folder)."""
        path = self.path(prefix_hash)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                return
            path.unlink()
        except OSError:
            return
        with self._lock:
            self._bytes -= info.st_size
            self._unindex(path.name)

    def discard(self, prefix_hash: str) -> None:
        """A chunk read from here was refused by the store (another model, wrong shape): delete it
        so that the recomputed chunk can take its place."""
        self.remove(prefix_hash)

    def prefix_hashes(self) -> list[str]:
        """Keys of every chunk file now in the directory (from their headers: unverified hints,
        `read` checks each chunk)."""
        return [keys[0] for keys in map(_keys, (path for path, _, _ in self._scan())) if keys is not None]

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
        return {"bytes": self._bytes, "evictions": self.evictions, "budget_bytes": self.budget_bytes,
                "write_errors": self.write_errors, "authenticated": self.secret is not None}

    # -- internals ----------------------------------------------------------------------------

    def _prepare(self) -> bool:
        """Create the tier's folder (mode 0700) and check who else may write to it; False if it
        cannot be created (a read-only disk: the tier then only ever misses)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            self._write_failed(err)
            return False
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"disk.path: {self.directory} exists and is not a directory (expected the tier's own "
                              "folder); remove it or choose another path")
        shared = info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if shared and self.secret is None:
            raise ConfigError(
                f"disk.path: the chunk folder {self.directory} can be written by other users (owner uid "
                f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}), so its chunks could be planted: set "
                f"disk.secret or {SECRET_ENV} (values are then authenticated), or make it private (chmod 700)")
        return True

    def _max_bytes(self) -> int:
        return min(self.budget_bytes, MAX_CHUNK_BYTES)

    def _write_failed(self, err: OSError) -> None:
        self.write_errors += 1
        if not self._failing:
            self._failing = True
            warnings.warn(f"disk chunk tier {self.directory}: write failed ({err.strerror or err}); chunks are kept "
                          "in RAM only until a write succeeds (failures are counted in stats()['disk']"
                          "['write_errors'])", StoreUnavailableWarning, stacklevel=4)

    def _collect_temps(self) -> None:
        """Remove temp files of writers that died (only temps of this tier's own file names)."""
        for temp in list_temp_files(self.directory):
            writer = temp_writer(temp)
            final = temp.name[1:].rpartition(SUFFIX + ".")[0] + SUFFIX
            if writer is not None and FILE_NAME.fullmatch(final) and is_stale_temp(temp):
                temp.unlink(missing_ok=True)

    def _index(self, file_name: str, prefix_hash: str, content_hash: str) -> None:
        self._unindex(file_name)
        self._by_content[content_hash] = prefix_hash
        self._content_of[file_name] = content_hash

    def _unindex(self, file_name: str) -> None:
        """Forget the content hash of a file that is gone (the index stays as large as the folder)."""
        content = self._content_of.pop(file_name, None)
        prefix_hash = self._by_content.get(content) if content is not None else None
        if prefix_hash is not None and chunk_file_name(prefix_hash) == file_name:
            del self._by_content[content]

    @contextmanager
    def _folder_turn(self) -> Iterator[None]:
        """This process's turn to change the folder: the lock held, the byte count recounted if
        another writer changed the folder since this tier's last write, the generation bumped."""
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 8, 0)
            generation = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            if generation != self._generation:
                self._bytes = sum(size for _, size, _ in self._scan())
            yield
            self._generation = (generation + 1) % 2**64
            os.pwrite(fd, self._generation.to_bytes(8, "little"), 0)
        finally:
            os.close(fd)  # releases the lock

    def _evict(self) -> None:
        """Remove the least recently used files until the folder fits the budget (the caller
        holds the folder's turn, so the listing is the whole truth)."""
        files = sorted(self._scan(), key=lambda f: (f[2], f[0].name))
        self._bytes = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if self._bytes <= self.budget_bytes:
                break
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                self._write_failed(err)
                break
            self._bytes -= size
            self.evictions += 1
            self._unindex(path.name)

    def _scan(self) -> list[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of every regular file named like this tier's chunk files."""
        try:
            files = regular_files(self.directory)
        except OSError:
            return []
        return [(p, info.st_size, info.st_mtime_ns) for p, info in files if FILE_NAME.fullmatch(p.name)]


def _keys(path: Path) -> tuple[str, str] | None:
    """(prefix hash, content hash) named in a chunk file's header (bounded read, no symlinks)."""
    try:
        metadata, _ = read_header(path, follow_symlinks=False)
    except SnapshotError:
        return None
    keys = metadata.get("prefix_hash"), metadata.get("content_hash")
    return (keys[0], keys[1]) if keys[0] is not None and keys[1] is not None else None


def _regular_size(path: Path) -> int:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def _touch(path: Path) -> None:
    """Mark a file recently used (its mtime is the LRU order every process shares)."""
    try:
        os.utime(path, follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass
