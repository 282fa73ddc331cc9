"""Faults around kvpatch (issue 21.4-5): the host out of page-locked memory, the offloader's disk
full, snapshot metadata crafted to exhaust the parser, paths the CLI cannot read. Each either
falls back with one warning and the same outputs, or stops with a clear kvpatch error."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kvpatch
import kvpatch.host_memory
from kvpatch.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from kvpatch.errors import OffloadSpaceError, SnapshotCorruptError
from kvpatch.host_memory import PinnedMemoryWarning, host_empty, pinned_fallbacks
from kvpatch.snapshot import read_metadata, read_snapshot
from kvpatch.snapshot.format import METADATA_KEY, METADATA_SHA_KEY
from kvpatch.stages.offloader import CpuOffloader
from kvpatch.testing import tiny_model


@pytest.fixture
def fresh_fallback_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning is once per process: start each test as a fresh process would."""
    monkeypatch.setattr(kvpatch.host_memory, "_fallbacks", 0)


def _no_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    real_empty = torch.empty

    def empty(*args: object, pin_memory: bool = False, **kwargs: object) -> torch.Tensor:
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaErrorMemoryAllocation) while pinning")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)


def test_out_of_pinned_memory_falls_back_to_pageable_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, fresh_fallback_count: None) -> None:
    _no_pinned_memory(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        buffers = [host_empty((2, 3), torch.float16, pin=True) for _ in range(3)]
    assert [b.shape for b in buffers] == [torch.Size([2, 3])] * 3 and not any(b.is_pinned() for b in buffers)
    assert pinned_fallbacks() == 3
    assert len([w for w in caught if issubclass(w.category, PinnedMemoryWarning)]) == 1


def test_a_store_asked_to_pin_on_a_host_that_cannot_still_reuses_exactly(
        monkeypatch: pytest.MonkeyPatch, fresh_fallback_count: None) -> None:
    """`pin_memory: true` on a host that cannot pin (no pinned allocator on a CPU-only host, none
    left on a GPU host: simulated here for both) used to raise inside generate's write-back; now
    the chunks are kept in pageable memory and reused."""
    _no_pinned_memory(monkeypatch)
    model, reference = tiny_model("llama"), tiny_model("llama")
    config = {"name": "pinned", "stages": [
        {"kind": "chunker", "impl": "fixed", "params": {"size": 16}},
        {"kind": "matcher", "impl": "exact"},
        {"kind": "store", "impl": "memory", "params": {"budget_bytes": 2**24, "pin_memory": True}}]}
    handle = kvpatch.apply(model, config)
    ids = torch.randint(5, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [model.generate(ids, **gen) for _ in range(2)]
        expected = reference.generate(ids, **gen)
    assert all(torch.equal(out, expected) for out in outs)
    assert handle.reuse.store.stats()["hits"] > 0  # the second request reused the first's chunks
    assert len([w for w in caught if issubclass(w.category, PinnedMemoryWarning)]) == 1


def test_mmap_offloader_out_of_disk_space_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    offloader = CpuOffloader(CpuOffloader.Params(backing="mmap", mmap_dir=str(tmp_path)))
    with pytest.raises(OffloadSpaceError, match=r"no room for 1,600 bytes .* \(params.mmap_dir\)"):
        offloader.to_host(torch.zeros(20, 20))
    assert not list(offloader.mmap_dir.iterdir())  # the failed file is not left behind


FULL_DISK_SCRIPT = """
import subprocess, sys, tempfile, torch
from kvpatch.errors import OffloadSpaceError
from kvpatch.stages.offloader import CpuOffloader
folder = tempfile.mkdtemp()
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder], capture_output=True).returncode:
    print("NO-MOUNT"); sys.exit(0)
try:
    offloader = CpuOffloader(CpuOffloader.Params(backing="mmap", mmap_dir=folder))
    try:
        offloader.to_host(torch.ones(256, 1024))  # 1 MiB into a 64 KiB filesystem
        print("NO-ERROR")
    except OffloadSpaceError as err:
        print("REFUSED", err)
    offloader.cleanup()
finally:
    subprocess.run(["umount", folder])
"""


def test_mmap_offloader_on_a_real_full_filesystem_raises_instead_of_sigbus() -> None:
    """Before space was reserved, the copy into a sparse mapping on a full tmpfs killed the
    process with SIGBUS (exit -7); run in a child so that a regression cannot kill pytest."""
    done = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT], capture_output=True, text=True, timeout=120)
    if "NO-MOUNT" in done.stdout:
        pytest.skip("mounting a small tmpfs needs root (the monkeypatched test covers the error path)")
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "REFUSED" in done.stdout and "No space left on device" in done.stdout


def _deeply_nested_snapshot(path: Path) -> Path:
    text = "[" * 100_000 + "]" * 100_000  # valid JSON, deeper than any parser's recursion limit
    save_file({"x": torch.zeros(1)}, str(path),
              metadata={METADATA_KEY: text, METADATA_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()})
    return path


def test_deeply_nested_metadata_is_refused_as_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _deeply_nested_snapshot(tmp_path / "deep.safetensors")
    with pytest.raises(SnapshotCorruptError, match="nested too deeply"):
        read_metadata(path)
    assert main(["snapshot", "inspect", str(path)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err


def test_a_path_the_cli_cannot_read_is_bad_input_not_a_traceback(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "is-a-folder.yaml"
    folder.mkdir()
    assert main(["snapshot", "gc", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    code = main(["validate", str(folder)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "Traceback" not in err


def _crafted(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file laid out as safetensors (u64 header length, JSON header, data) with any content."""
    size = len(header) if length is None else length
    path.write_bytes(size.to_bytes(8, "little", signed=length is not None and length < 0) + header + data)
    return path


def _entries(**tensors: dict) -> bytes:
    return json.dumps(tensors).encode()


CRAFTED = {
    "header length past the end": dict(header=b"{}", length=2**40),
    "header length of 2**64 - 1": dict(header=b"{}", length=2**64 - 1),
    "negative header length": dict(header=b"{}", length=-1),
    "offsets past the end": dict(header=_entries(x={"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}),
                                 data=bytes(16)),
    "overlapping tensors": dict(header=_entries(a={"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                b={"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}),
                                data=bytes(24)),
    "shape that disagrees with the offsets": dict(
        header=_entries(x={"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 16]}), data=bytes(16)),
    "unknown dtype": dict(header=_entries(x={"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}),
                          data=bytes(16)),
    "negative shape": dict(header=_entries(x={"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}),
                           data=bytes(16)),
    "deeply nested header": dict(header=b"[" * 200_000 + b"]" * 200_000),
    "header that is not JSON": dict(header=b"\xff\xfe not json"),
}


@pytest.mark.parametrize("case", list(CRAFTED), ids=list(CRAFTED))
def test_crafted_safetensors_are_refused_before_any_large_allocation(case: str, tmp_path: Path) -> None:
    path = _crafted(tmp_path / "crafted.safetensors", **CRAFTED[case])
    tracemalloc.start()
    try:
        with pytest.raises(SnapshotCorruptError):
            read_metadata(path)
        with pytest.raises(SnapshotCorruptError):
            read_snapshot(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{case}: {peak:,} bytes allocated before refusing"
