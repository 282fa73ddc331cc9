"""Chunk-store integrity under hostile or careless use (issues 21 and 25): a chunk is bound to its
key, model namespace, tokens and shape in every tier and in chunk-store snapshots; shared tiers
are authenticated; the disk tier owns only its own files and survives a full or read-only disk;
snapshot readers never open special files; a partial chunk is never visible."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import kvpatch
from kvpatch.errors import ConfigError, SnapshotError, SnapshotMismatchError
from kvpatch.model_shapes import ModelShapes
from kvpatch.reuse.chunk import ChunkForeignError, ChunkFormatError, StoredChunk, StoreUnavailableWarning
from kvpatch.reuse.chunk_hash import ChunkHasher, token_bytes
from kvpatch.reuse.chunker import chunk_spans
from kvpatch.patch.reuse_controller import reuse_namespace
from kvpatch.reuse.disk_tier import LOCK_NAME, DiskTier, chunk_file_name
from kvpatch.reuse.memory_store import TieredChunkStore
from kvpatch.reuse.sealed import SECRET_ENV, seal, unseal
from kvpatch.reuse.writeback import ChunkWriter, NewChunk
from kvpatch.stages.store_memory import MemoryStore
from kvpatch.snapshot import export_store, import_store, read_metadata, read_store_snapshot
from kvpatch.files.folders import gc
from kvpatch.snapshot.format import METADATA_KEY, METADATA_SHA_KEY
from kvpatch.files.safetensors_io import read_header, read_tensors, write_atomic
from kvpatch.testing import tiny_model

CHUNK = 8
SECRET = "s" * 32


@pytest.fixture(autouse=True)
def _no_ambient_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return tiny_model("llama")


def reuse_config(store: dict | None = None) -> dict:
    params = {"budget_bytes": 2**26, **(store or {})}
    return {"name": "integrity", "stages": [
        {"kind": "chunker", "impl": "fixed", "params": {"size": CHUNK}},
        {"kind": "matcher", "impl": "exact"},
        {"kind": "store", "impl": "memory", "params": params}]}


def tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 300, (1, length), generator=torch.Generator().manual_seed(seed))


def last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=1).logits[:, -1]


def keys(hasher: ChunkHasher, ids: torch.Tensor) -> list[str]:
    return hasher.prefix_hashes(ids[0], chunk_spans(ids[0].tolist(), CHUNK))


def bound_chunk(hasher: ChunkHasher, ids: torch.Tensor, layers: int = 2, seed: int = 0) -> StoredChunk:
    """A chunk of the first CHUNK tokens of `ids` that passes every binding check of `hasher`."""
    row = ids[0, :CHUNK].clone()
    data = token_bytes(row)
    kv = torch.randn(layers, 2, 2, CHUNK, 16, generator=torch.Generator().manual_seed(seed))
    return StoredChunk(hasher.prefix_hash(hasher.namespace, data), hasher.content_hash(data), row, 0, {"kv": kv},
                       namespace=hasher.namespace, parent_hash=hasher.namespace)


def bound_store(model: torch.nn.Module, **kw: object) -> tuple[TieredChunkStore, ChunkHasher]:
    hasher = ChunkHasher(reuse_namespace(model))
    store = TieredChunkStore(10**8, **kw)  # type: ignore[arg-type]
    store.bind(hasher, ModelShapes.of(model.config))
    return store, hasher


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer appears)."""
    def expire(*_: object) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- a chunk is bound to its key, namespace, tokens and shape ------------------------------------------


def test_disk_file_copied_over_another_key_is_a_miss_and_outputs_stay_exact(tmp_path: Path, reference) -> None:
    ids_a, ids_b = tokens(20, 1), tokens(20, 2)
    model = tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config({"disk": {"path": str(tmp_path)}}))
    last_logits(model, ids_a), last_logits(model, ids_b)
    assert handle.reuse.store.flush() > 0
    tier = handle.reuse.store.disk
    a0, b0 = keys(handle.reuse.hasher, ids_a)[0], keys(handle.reuse.hasher, ids_b)[0]
    shutil.copyfile(tier.path(b0), tier.path(a0))
    with pytest.raises(ChunkForeignError, match="copied from another key"):
        DiskTier(tmp_path, 10**8).read(a0)
    shutil.copyfile(tier.path(b0), tier.path(a0))

    fresh = tiny_model("llama")
    fresh_handle = kvpatch.apply(fresh, reuse_config({"disk": {"path": str(tmp_path)}}))
    with pytest.warns(RuntimeWarning, match="copied from another key"):
        out = last_logits(fresh, ids_a)
    torch.testing.assert_close(out, last_logits(reference, ids_a), atol=1e-5, rtol=0)
    stats = fresh_handle.reuse.store.stats()
    assert stats["foreign"] == 1 and stats["misses"] >= 1
    assert fresh_handle.reuse.last.reused_tokens > 0  # the intact chunks after it were still used
    assert not tier.path(a0).exists() or unseal(tier.path(a0).read_bytes(), "rewritten", key=a0).prefix_hash == a0


def test_other_model_namespace_and_wrong_tokens_are_refused(tmp_path: Path, reference) -> None:
    other = tiny_model("llama", seed=1)
    store, hasher = bound_store(reference, disk=DiskTier(tmp_path, 10**8))
    ids = tokens(CHUNK, 3)
    good = bound_chunk(hasher, ids)
    foreign_ns = bound_chunk(ChunkHasher(reuse_namespace(other)), ids)
    assert foreign_ns.namespace != hasher.namespace
    assert store.put(foreign_ns) is False  # another model's chunk is never admitted
    wrong_tokens = bound_chunk(hasher, ids)
    wrong_tokens.token_ids = wrong_tokens.token_ids.flip(0)
    assert store.put(wrong_tokens) is False
    assert store.stats()["foreign"] == 2 and not store.contains(good.prefix_hash)

    # the same two, planted in the disk tier under this model's keys by someone else
    store.disk.write(StoredChunk(good.prefix_hash, good.content_hash, good.token_ids, 0, good.tensors,
                                 namespace=foreign_ns.namespace, parent_hash=good.parent_hash))
    with pytest.warns(RuntimeWarning, match="model namespace"):
        assert store.get(good.prefix_hash) is None
    store.disk.write(wrong_tokens)
    assert store.get(good.prefix_hash) is None
    assert store.stats()["foreign"] == 4 and not store.disk.contains(good.prefix_hash)  # discarded
    assert store.put(good) is True and store.get(good.prefix_hash) is not None


def test_ram_refuses_chunks_of_a_previous_binding(reference) -> None:
    store, hasher = bound_store(reference)
    chunk = bound_chunk(hasher, tokens(CHUNK, 4))
    assert store.put(chunk)
    other = tiny_model("llama", seed=1)
    store.bind(ChunkHasher(reuse_namespace(other)), ModelShapes.of(other.config))
    with pytest.warns(RuntimeWarning, match="model namespace"):
        assert store.get(chunk.prefix_hash) is None
    assert store.stats()["foreign"] == 1 and store.stats()["ram"]["chunks"] == 0


def test_incomplete_chunk_is_never_visible(tmp_path: Path, reference) -> None:
    store, hasher = bound_store(reference, disk=DiskTier(tmp_path, 10**8))
    ids = tokens(CHUNK, 5)
    torn = bound_chunk(hasher, ids, layers=1)  # one layer of the model's two
    writer = ChunkWriter(store)
    writer.write([NewChunk(torn.prefix_hash, torn.content_hash, torn.token_ids, 0, torn.tensors["kv"],
                           torn.parent_hash)], "dense")
    assert not store.contains(torn.prefix_hash) and store.stats()["foreign"] == 1
    assert not store.disk.contains(torn.prefix_hash)
    store.disk.write(torn)  # a torn chunk written by another process
    assert store.get(torn.prefix_hash) is None and store.stats()["foreign"] == 2
    whole = bound_chunk(hasher, ids, layers=2)
    writer.write([NewChunk(whole.prefix_hash, whole.content_hash, whole.token_ids, 0, whole.tensors["kv"],
                           whole.parent_hash)], "dense")
    got = store.get(whole.prefix_hash)
    assert got is not None and got.tensors["kv"].shape[0] == 2 and got.namespace == hasher.namespace


class _Copy:
    """A copy-completion marker the test finishes by hand (a CUDA event on the GPU)."""

    def __init__(self) -> None:
        self.finished = threading.Event()

    def query(self) -> bool:
        return self.finished.is_set()

    def synchronize(self) -> None:
        assert self.finished.wait(10), "the copy never finished"


def test_writer_admits_each_chunk_once_its_copy_finishes(reference) -> None:
    """Chunks whose host copies are in flight are admitted by the writer's worker once the copy
    finishes (never before); a request's flush(wait=False) admits finished ones the worker has
    not reached without waiting; flush() waits for all. Each chunk is put exactly once."""
    store, hasher = bound_store(reference)
    puts: list[str] = []
    put = store.put
    store.put = lambda chunk: puts.append(chunk.prefix_hash) or put(chunk)  # type: ignore[method-assign]
    writer = ChunkWriter(store)
    chunks = [bound_chunk(hasher, tokens(CHUNK, 200 + i), seed=i) for i in range(3)]
    copies = [_Copy() for _ in chunks]
    for copy, chunk in zip(copies, chunks):
        writer.submit(copy, [chunk])
    writer.flush(wait=False)
    assert not any(store.contains(c.prefix_hash) for c in chunks)  # no copy has finished
    copies[0].finished.set()
    deadline = time.monotonic() + 10
    while not store.contains(chunks[0].prefix_hash) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.contains(chunks[0].prefix_hash) and not store.contains(chunks[2].prefix_hash)
    copies[2].finished.set()
    copies[1].finished.set()
    writer.flush()
    assert all(store.contains(c.prefix_hash) for c in chunks)
    assert sorted(puts) == sorted(c.prefix_hash for c in chunks)


def test_writer_reraises_a_failed_write_back_at_flush(reference) -> None:
    store, hasher = bound_store(reference)
    store.put = lambda chunk: (_ for _ in ()).throw(OSError("disk full"))  # type: ignore[method-assign]
    writer = ChunkWriter(store)
    copy = _Copy()
    copy.finished.set()
    writer.submit(copy, [bound_chunk(hasher, tokens(CHUNK, 300))])
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    writer.flush()  # reported once


def test_store_is_safe_under_concurrent_puts_and_gets(reference) -> None:
    store, hasher = bound_store(reference)
    store.budget_bytes = 6 * bound_chunk(hasher, tokens(CHUNK, 0)).nbytes()
    chunks = [bound_chunk(hasher, tokens(CHUNK, 100 + i), seed=i) for i in range(24)]
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for step in range(120):
                chunk = chunks[(offset + step) % len(chunks)]
                store.put(chunk)
                got = store.get(chunks[(offset + 3 * step) % len(chunks)].prefix_hash)
                if got is not None and got.tensors["kv"].shape[0] != 2:
                    raise AssertionError("a partial chunk was served")
        except BaseException as err:  # noqa: BLE001  (reported by the main thread)
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i * 5,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    stats = store.stats()
    assert stats["ram"]["bytes"] <= store.budget_bytes and stats["foreign"] == 0
    assert stats["ram"]["chunks"] == sum(1 for _ in store.iter_chunks())


def test_old_chunk_format_is_refused_with_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = bound_chunk(ChunkHasher("ns"), tokens(CHUNK, 6))
    with monkeypatch.context() as patch:
        patch.setattr("kvpatch.reuse.chunk.CHUNK_FORMAT_VERSION", 1)
        old = seal(chunk)  # what a version-1 writer left in a shared tier
    with pytest.raises(ChunkFormatError, match="field 'version': expected 2, found '1'"):
        unseal(old, "old chunk")


# -- authenticated disk tier ------------------------------------------------------------------------


def test_disk_tier_with_a_secret_refuses_unauthenticated_files(tmp_path: Path, reference) -> None:
    hasher = ChunkHasher(reuse_namespace(reference))
    chunk = bound_chunk(hasher, tokens(CHUNK, 7))
    DiskTier(tmp_path, 10**8).write(chunk)  # written by a process without the secret
    store, _ = bound_store(reference, disk=DiskTier(tmp_path, 10**8, secret=SECRET))
    with pytest.warns(RuntimeWarning, match="written without the chunk secret"):
        assert store.get(chunk.prefix_hash) is None
    assert store.stats()["unauthenticated"] == 1
    DiskTier(tmp_path, 10**8, secret="t" * 32).write(chunk)  # another secret
    assert store.get(chunk.prefix_hash) is None and store.stats()["unauthenticated"] == 2
    store.disk.write(chunk)
    assert store.get(chunk.prefix_hash) is not None and store.stats()["disk"]["authenticated"]


def test_disk_tier_others_can_write_needs_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, 10**8)
    assert stat.S_IMODE(tier.directory.stat().st_mode) & 0o077 == 0  # created private
    tier.directory.chmod(0o777)
    with pytest.raises(ConfigError, match="can be written by other users"):
        DiskTier(tmp_path, 10**8)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert DiskTier(tmp_path, 10**8).stats()["authenticated"]
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ConfigError, match=f"{SECRET_ENV}: a chunk secret must be at least 16 bytes"):
        DiskTier(tmp_path, 10**8)


# -- the disk tier owns only its own files ------------------------------------------------------------


def plant_foreign_entries(tier: DiskTier, outside: Path) -> dict[str, Path]:
    """Entries a tier must neither open nor delete, some named exactly like its own files."""
    outside.write_bytes(b"precious")
    entries = {
        "fifo": tier.path("f" * 64),
        "symlink": tier.path("e" * 64),
        "directory": tier.path("d" * 64),
        "foreign file": tier.directory / "notes.txt",
        "temp-named fifo": tier.directory / f".{'c' * 64}.safetensors.{os.uname().nodename}-999999-abc.tmp",
        "temp-named directory": tier.directory / f".{'b' * 64}.safetensors.host-1-abc.tmp",
        "file in the root": tier.root / chunk_file_name("a" * 64),
    }
    os.mkfifo(entries["fifo"])
    os.symlink(outside, entries["symlink"])
    entries["directory"].mkdir()
    entries["foreign file"].write_bytes(b"x" * 10_000)
    os.mkfifo(entries["temp-named fifo"])
    entries["temp-named directory"].mkdir()
    entries["file in the root"].write_bytes(b"y" * 10_000)
    return entries


def test_foreign_entries_are_never_opened_or_deleted(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    first = DiskTier(tmp_path / "tier", 10**8)
    entries = plant_foreign_entries(first, outside)
    chunk = bound_chunk(ChunkHasher("ns"), tokens(CHUNK, 8))
    size = len(seal(chunk))
    with deadline(20):
        tier = DiskTier(tmp_path / "tier", 3 * size)  # opening scans and collects temp files
        assert tier.stats()["bytes"] == 0
        for i in range(8):  # far over the budget: eviction runs on every write
            c = bound_chunk(ChunkHasher("ns"), tokens(CHUNK, 20 + i), seed=i)
            tier.write(c)
        for name in ("fifo", "symlink", "directory"):
            with pytest.raises(ChunkForeignError, match="not a regular file"):
                tier.read(entries[name].name.removesuffix(".safetensors"))
        store = TieredChunkStore(10**8, disk=tier)
        with pytest.warns(RuntimeWarning, match="a FIFO, not a regular file"):
            assert store.get("f" * 64) is None
        assert len(tier.prefix_hashes()) == len(list(tier.iter_chunks())) == 3
    assert all(os.path.lexists(p) for p in entries.values()), [n for n, p in entries.items() if not os.path.lexists(p)]
    assert outside.read_bytes() == b"precious"
    own = [p for p in tier.directory.iterdir() if p.is_file() and not p.is_symlink() and p.name not in ("notes.txt", LOCK_NAME)]
    assert tier.evictions == 5 and len(own) == 3 and tier.stats()["bytes"] == sum(p.stat().st_size for p in own)


def test_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10_000)
    path = tier.path("9" * 64)
    with open(path, "wb") as handle:
        handle.truncate(10**9)  # sparse: reading it all would take a gigabyte
    with pytest.raises(ChunkFormatError, match="more than the 10000 accepted"):
        tier.read("9" * 64)
    assert not path.exists()  # its own name in its own folder: removed


@pytest.mark.parametrize("fault", ["enospc", "read-only"])
def test_full_or_read_only_disk_never_fails_generate(tmp_path: Path, reference, fault: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config({"budget_bytes": 1, "disk": {"path": str(tmp_path)}}))
    tier = handle.reuse.store.disk
    if fault == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions; the enospc case injects the same failure")
        tier.directory.chmod(0o500)
    else:
        def full(*_: object, **__: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "replace", full)
    ids = tokens(20, 9)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [last_logits(model, ids) for _ in range(3)]
    finally:
        tier.directory.chmod(0o700)
    unavailable = [w for w in caught if issubclass(w.category, StoreUnavailableWarning)]
    assert len(unavailable) == 1 and "write failed" in str(unavailable[0].message)
    for out in outs:
        torch.testing.assert_close(out, last_logits(reference, ids), atol=1e-5, rtol=0)
    assert tier.stats()["write_errors"] >= 3
    assert not [p for p in tier.directory.iterdir() if p.name != LOCK_NAME]  # nothing half-written left behind


# -- snapshot readers -------------------------------------------------------------------------------


def test_snapshot_readers_never_open_special_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    link = tmp_path / "zero.safetensors"
    os.symlink("/dev/zero", link)
    with deadline(20):
        for path, kind in ((fifo, "a FIFO"), (folder, "a directory"), (link, "a character device")):
            with pytest.raises(SnapshotError, match=f"is {kind}, not a regular file"):
                read_metadata(path)
            with pytest.raises(SnapshotError, match="not a regular file"):
                read_tensors(path)
            with pytest.raises(SnapshotError, match="not a regular file"):
                read_store_snapshot(path)
        temp_fifo = tmp_path / f".x.safetensors.{os.uname().nodename}-999999-abc.tmp"
        os.mkfifo(temp_fifo)
        (tmp_path / f".y.safetensors.{os.uname().nodename}-999999-abc.tmp").mkdir()
        report = gc(tmp_path, keep=0, older_than_s=0)
    assert report.removed_temp_files == [] and report.removed_snapshots == []
    assert fifo.exists() and folder.exists() and os.path.lexists(link) and os.path.lexists(temp_fifo)


# -- chunk-store snapshots ----------------------------------------------------------------------------


def resign(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a snapshot with edited metadata and a recomputed metadata checksum (a forger's edit)."""
    header, _ = read_header(path)
    meta = json.loads(header[METADATA_KEY])
    edit(meta)
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    write_atomic(path, read_tensors(path), {METADATA_KEY: text, METADATA_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()})


def test_snapshot_chunks_are_bound_to_their_keys(tmp_path: Path, reference) -> None:
    config = kvpatch.load_config(reuse_config())
    model = tiny_model("llama")
    handle = kvpatch.apply(model, config)
    last_logits(model, tokens(20, 10)), last_logits(model, tokens(20, 11))
    path = export_store(tmp_path / "chunks.safetensors", handle.reuse.store, model, config)
    assert read_metadata(path).format_version == 2
    records = read_metadata(path).chunks
    assert all(r.namespace == handle.reuse.hasher.namespace and r.parent_hash for r in records)

    def swap_keys(meta: dict) -> None:  # chunk 0 claims chunk 1's key and the other way round
        a, b = meta["chunks"][0], meta["chunks"][1]
        a["prefix_hash"], b["prefix_hash"] = b["prefix_hash"], a["prefix_hash"]

    resign(path, swap_keys)
    target = kvpatch.apply(tiny_model("llama"), config).reuse.store
    with pytest.warns(RuntimeWarning, match="do not hash to its key"):
        admitted = import_store(path, target, reference, config)
    assert admitted == len(records) - 2 and target.stats()["foreign"] == 2
    assert not target.contains(records[0].prefix_hash) and not target.contains(records[1].prefix_hash)

    resign(path, lambda meta: meta.update(format_version=1))
    with pytest.raises(SnapshotMismatchError, match="export the store again") as caught:
        read_store_snapshot(path)
    assert caught.value.field == "format_version" and caught.value.expected == 2


# -- config validation ---------------------------------------------------------------------------------


def test_tier_config_is_validated_before_use(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"params.disk.path: .* exists and is not a directory"):
        kvpatch.load_config(reuse_config({"disk": {"path": str(a_file)}}))
    with pytest.raises(ConfigError, match=r"params.redis.url: 'http://h:6379' has scheme 'http'; expected one of redis"):
        kvpatch.load_config(reuse_config({"redis": {"url": "http://h:6379"}}))
    with pytest.raises(ConfigError, match="params.redis.secret: a chunk secret must be at least 16") as caught:
        kvpatch.load_config(reuse_config({"redis": {"secret": "hunter2"}}))
    assert "hunter2" not in str(caught.value)  # a secret is never echoed
    params = MemoryStore.Params.model_validate({"redis": {"secret": SECRET}})
    assert SECRET not in repr(params) and SECRET not in json.dumps(params.model_dump(mode="json"))
