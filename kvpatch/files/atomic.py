"""Atomic file writes: a path holds its old content or all of the new, never a mix.

The one place kvpatch writes a file it may later read (snapshots, chunk files, indexes, eval and
tune results): a unique temp file next to the target that names its writer (so concurrent
writers never collide and a collector can tell an abandoned temp from a live one), fsync,
`os.replace`, then fsync of the directory so the rename itself survives a power cut. An
exception, or a process killed inside the write, leaves the old file (or none) and at most the
temp file. Torch-free, so the CLI can use it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A unique hidden temp file next to `path`: `.{name}.{host}-{pid}-{random}.tmp`."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces `path` only once the block completes without error."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(final)
    try:
        with open(temp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))
