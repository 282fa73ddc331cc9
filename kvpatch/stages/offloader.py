"""`offloader/cpu`: moves K/V to host memory and back.

Device-to-host copies go into pinned buffers on a side CUDA stream, so they overlap the next
kernels instead of stalling the decode step; bringing tensors back first waits for that stream.
On a CPU-only machine the "copy" is a clone. With `backing: mmap` the host copies live in
memory-mapped files instead (one per tensor, in a temporary directory): the OS may page them out
to disk, so host RAM stops bounding the offloaded context; copies into them are synchronous
(a file mapping is not page-locked). `cleanup()` (or garbage collection, or interpreter exit)
deletes the files. Used by `evictor/budget` (evicted tokens kept restorable instead of dropped)
and `evictor/tiered` (the cold tier).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from ..errors import OffloadSpaceError
from ..host_memory import host_empty
from ..registry import Stage, register_stage
from ..stage_specs.offloader import CpuOffloaderParams


@register_stage("offloader", "cpu")
class CpuOffloader(Stage):
    """Host-memory offload of K/V with pinned buffers and an asynchronous side stream."""

    Params = CpuOffloaderParams
    params: CpuOffloaderParams

    def __init__(self, params: CpuOffloaderParams) -> None:
        super().__init__(params)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._mmap_dir: Path | None = None
        self._file_ids = itertools.count()
        self._finalizer: weakref.finalize | None = None
        self.bytes_offloaded = 0
        self.bytes_restored = 0
        self.files_created = 0

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` in this offloader's backing; asynchronous for CUDA tensors
        into pinned memory (call `wait` before reading it on the host; `to_device` does)."""
        self.bytes_offloaded += tensor.numel() * tensor.element_size()
        host = self._host_empty(tensor.shape, tensor.dtype)
        if tensor.device.type != "cuda" or self.params.backing == "mmap":
            return host.copy_(tensor)
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # keep the source alive until the copy has run
        return host

    def _host_empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self.params.backing == "mmap":
            return self._mapped(shape, dtype)
        return host_empty(shape, dtype, pin=self.params.pin_memory and torch.cuda.is_available())

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` (from `to_host`) on `device`, after every pending host copy has finished."""
        self.bytes_restored += tensor.numel() * tensor.element_size()
        if device.type == "cuda":
            self.wait()
            return tensor.to(device, non_blocking=self.params.pin_memory)
        return tensor.to(device)

    def wait(self) -> None:
        """Block until every pending host copy has landed (before reading host tensors)."""
        for stream in self._streams.values():
            stream.synchronize()

    def _mapped(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor backed by a new file in this offloader's directory."""
        if self._mmap_dir is None:
            self._mmap_dir = Path(tempfile.mkdtemp(prefix="kvpatch-offload-", dir=self.params.mmap_dir))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._mmap_dir, True)
        path = self._mmap_dir / f"{next(self._file_ids)}.bin"
        count = max(1, math.prod(shape))  # size 0 would map nothing: one element of backing
        _reserve(path, count * dtype.itemsize)
        self.files_created += 1
        flat = torch.from_file(str(path), shared=True, size=count, dtype=dtype)
        return flat[: math.prod(shape)].view(shape)

    @property
    def mmap_dir(self) -> Path | None:
        """The directory of this offloader's backing files (None before the first one)."""
        return self._mmap_dir

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def cleanup(self) -> None:
        """Wait for pending copies, release the side streams and delete the backing files
        (tensors already mapped stay readable until freed; new ones get a new directory)."""
        self.wait()
        self._streams.clear()
        if self._finalizer is not None:
            self._finalizer()
        self._mmap_dir = self._finalizer = None

    def __enter__(self) -> "CpuOffloader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def stats(self) -> dict[str, Any]:
        return {"bytes_offloaded": self.bytes_offloaded, "bytes_restored": self.bytes_restored,
                "backing": self.params.backing, "files_created": self.files_created}


def _reserve(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` of disk blocks allocated now. A sparse file (what a plain
    truncate or `torch.from_file` makes) on a full disk maps fine and then kills the process with
    SIGBUS at the first write into a page that has no block; reserving first turns that into an
    error raised here, naming the folder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise OffloadSpaceError(err.errno, f"offloader/cpu: no room for {nbytes:,} bytes of offloaded K/V in "
                                f"{path.parent} (params.mmap_dir): {os.strerror(err.errno or 0)}") from None
    os.close(fd)
