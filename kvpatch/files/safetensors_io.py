"""Snapshot files on disk: atomic writes, structurally verified reads, the content checksum.

A snapshot is one safetensors file (streamed out here, read with `safe_open`), so the whole
thing is replaced with a single `os.replace`: a reader (or a process killed mid-write) sees the
old file or the new one, never a mix. The reader parses and bounds-checks the safetensors header itself before handing the file to
`safe_open`, so damaged files fail here with a SnapshotCorruptError that says what is wrong,
not deep inside a parser. Nothing is ever unpickled.

Only regular files are ever opened: a FIFO, device, socket or directory at a snapshot (or chunk
file) path is refused by `stat` before any `open` (and `open` is non-blocking, re-checked with
`fstat`, against a swap in between), so a reader never hangs on a FIFO or reads a device. Every
read is bounded: headers by MAX_HEADER_BYTES, whole-file reads (`read_regular`) by their caller's cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from ..errors import SnapshotCorruptError, SnapshotError
from .atomic import TEMP_SUFFIX, atomic_file

SUFFIX = ".safetensors"
#: Largest header we accept (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: safetensors dtype codes kvpatch snapshots may hold, with torch's dtype.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The name the metadata uses for a dtype ("float32", "bfloat16", "uint8", ...)."""
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bfloat16 included), copied to the CPU if needed."""
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def update_digest(digest: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    """Feed one named tensor to a hash: name, dtype, shape, then its bytes. Covering names, dtypes
    and shapes means an edit that reinterprets intact bytes changes the hash too."""
    digest.update(f"{name}\0{dtype_name(t.dtype)}\0{json.dumps(list(t.shape))}\0".encode())
    digest.update(tensor_bytes(t))


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in name order (see `update_digest`)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        update_digest(digest, name, tensors[name])
    return digest.hexdigest()


def temp_writer(path: Path) -> tuple[str, int] | None:
    """(host, pid) of the writer named in a `temp_path` file name; None for any other file."""
    name = path.name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    _, marker, writer = name[1 : -len(TEMP_SUFFIX)].rpartition(SUFFIX + ".")
    parts = writer.rsplit("-", 2)
    if not marker or len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def write_atomic(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Write a safetensors file so that `path` holds either its old content or all of the new."""
    if Path(path).suffix != SUFFIX:
        raise SnapshotError(f"snapshot path {path} must end in {SUFFIX}")
    with atomic_file(path) as handle:
        _serialize(handle, tensors, header)
    return Path(path)


def _serialize(handle: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Stream the safetensors layout (8-byte header length, JSON header padded to 8 bytes, data)
    tensor by tensor. Not `safetensors.save_file`: it writes its own `.tmpXXXX` file, which a
    killed writer would leak under a name `gc` cannot attribute; `save` would hold a second copy
    of the whole cache in memory. Larger items first keeps every tensor aligned, as safetensors does."""
    codes = {dtype: code for code, dtype in DTYPES.items()}
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries: dict[str, object] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in codes:
            raise SnapshotError(f"cannot store tensor {name} of dtype {t.dtype} in a snapshot")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    handle.write(header_bytes(metadata, entries))
    for name in order:
        handle.write(tensor_bytes(tensors[name]))


def header_bytes(metadata: dict[str, str], entries: Mapping[str, object]) -> bytes:
    """The safetensors header: 8-byte length, then the JSON (metadata first) padded to 8 bytes."""
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class NotRegularFileError(SnapshotError):
    """A path that is not a regular file (directory, FIFO, device, socket; or a symlink where
    links are not followed): refused without opening it."""


def check_regular(path: Path, where: str, follow_symlinks: bool = True) -> os.stat_result:
    """`path`'s stat if it is a regular file; NotRegularFileError (or SnapshotError: missing)."""
    try:
        info = os.stat(path) if follow_symlinks else os.lstat(path)
    except FileNotFoundError:
        raise SnapshotError(f"no {where} at {path}") from None
    except OSError as err:
        raise SnapshotError(f"cannot read {where} {path}: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFileError(f"{where} {path} is {_file_kind(info.st_mode)}, not a regular file: not opened")
    return info


@contextmanager
def open_regular(path: Path, where: str, follow_symlinks: bool = True) -> Iterator[tuple[BinaryIO, int]]:
    """(handle, size) of a regular file, opened only after `check_regular`, non-blocking and
    re-checked with `fstat` (a FIFO swapped in between is refused, not waited on)."""
    check_regular(path, where, follow_symlinks)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SnapshotError(f"no {where} at {path}") from None
    except OSError as err:
        raise SnapshotError(f"cannot read {where} {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(f"{where} {path} is {_file_kind(info.st_mode)}, not a regular file")
        yield handle, info.st_size


def read_regular(path: Path, where: str, max_bytes: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (larger: SnapshotCorruptError, nothing read)."""
    with open_regular(path, where, follow_symlinks) as (handle, size):
        if size > max_bytes:
            raise SnapshotCorruptError(f"{where} {path}: {size} bytes, more than the {max_bytes} accepted")
        try:
            data = handle.read(max_bytes + 1)
        except OSError as err:
            raise SnapshotError(f"cannot read {where} {path}: {err.strerror}") from None
    if len(data) > max_bytes:
        raise SnapshotCorruptError(f"{where} {path}: grew past the {max_bytes} bytes accepted while being read")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symlink"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_header(path: Path, follow_symlinks: bool = True) -> tuple[dict[str, str], dict[str, dict]]:
    """The `__metadata__` strings and the tensor entries of a safetensors file, after checking
    that the header is well-formed JSON and that the tensors tile the data section exactly."""
    with open_regular(path, "snapshot", follow_symlinks) as (handle, size):
        try:
            prefix = handle.read(8)
            length = _header_length(f"snapshot {path}", prefix, size)
            raw = handle.read(length)
        except OSError as err:
            raise SnapshotError(f"cannot read snapshot {path}: {err.strerror}") from None
    return _decode_header(f"snapshot {path}", raw, size - 8 - length)


def parse_header(data: bytes | memoryview, where: str) -> tuple[dict[str, str], dict[str, dict], int]:
    """`read_header` for safetensors bytes in memory (`where` names them in errors); also returns
    the offset at which the tensor data starts."""
    length = _header_length(where, bytes(data[:8]), len(data))
    metadata, entries = _decode_header(where, bytes(data[8 : 8 + length]), len(data) - 8 - length)
    return metadata, entries, 8 + length


def _header_length(where: str, prefix: bytes, size: int) -> int:
    if len(prefix) < 8:
        raise SnapshotCorruptError(f"{where}: {size} bytes, too short to be safetensors (truncated?)")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise SnapshotCorruptError(f"{where}: header length {length} does not fit {size} bytes (truncated or damaged)")
    return length


def _decode_header(where: str, raw: bytes, data_bytes: int) -> tuple[dict[str, str], dict[str, dict]]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SnapshotCorruptError(f"{where}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SnapshotCorruptError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SnapshotCorruptError(f"{where}: safetensors __metadata__ is not a map of strings")
    _check_layout(where, header, data_bytes)
    return metadata, header


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys")
    return result


def _check_layout(where: str, entries: dict[str, object], data_bytes: int) -> None:
    """Each entry has a known dtype, a shape and offsets sized for it; together they cover the
    data section end to end without gaps or overlaps (what safetensors writes)."""
    spans = []
    for name, entry in entries.items():
        ok = (
            isinstance(entry, dict)
            and entry.keys() == {"dtype", "shape", "data_offsets"}
            and entry["dtype"] in DTYPES
            and _int_list(entry["shape"])
            and _int_list(entry["data_offsets"])
            and len(entry["data_offsets"]) == 2
        )
        if not ok:
            raise SnapshotCorruptError(f"{where}: malformed safetensors entry for tensor {name!r}")
        begin, end = entry["data_offsets"]
        count = 1
        for dim in entry["shape"]:
            count *= dim
        if end - begin != count * DTYPES[entry["dtype"]].itemsize:
            raise SnapshotCorruptError(f"{where}: tensor {name!r} offsets do not match its dtype and shape")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise SnapshotCorruptError(f"{where}: tensor data has a gap or overlap at byte {position}")
        position = end
    if position != data_bytes:
        raise SnapshotCorruptError(
            f"{where}: tensor data is {data_bytes} bytes but the header describes {position} (truncated or damaged)"
        )


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file whose header `read_header` accepted, read with `safe_open`."""
    check_regular(path, "snapshot")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # the header was validated; anything left is a damaged or vanished file
        raise SnapshotCorruptError(f"snapshot {path}: safetensors could not read the tensors ({err})") from None
