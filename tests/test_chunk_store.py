"""Chunk stores (kvpatch.reuse stores, `store/memory`): codecs, RAM budget and eviction order,
disk spill and promotion, refusal of damaged files, concurrent writers, chunk-store snapshots."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import kvpatch
from kvpatch.errors import SnapshotCorruptError, SnapshotMismatchError
from kvpatch.pipeline import Pipeline
from kvpatch.reuse.chunk import ChunkFormatError, StoredChunk
from kvpatch.reuse.codecs import BITS, GROUP_SIZE, dense_kv, encode_chunk, kv_shape
from kvpatch.reuse.disk_tier import FILE_NAME, SUBDIR, DiskTier, chunk_file_name
from kvpatch.reuse.memory_store import TieredChunkStore
from kvpatch.reuse.sealed import seal, unseal
from kvpatch.snapshot import export_store, import_store, read_metadata, read_store_snapshot
from kvpatch.testing import tiny_model

SHAPE = (2, 2, 16, 8)  # layers, kv_heads, tokens, head_dim


def make_chunk(i: int, shape: tuple[int, int, int, int] = SHAPE, content: str | None = None,
               dtype: torch.dtype = torch.float32) -> StoredChunk:
    layers, heads, tokens, dim = shape
    g = torch.Generator().manual_seed(i)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=g).to(dtype)
    return StoredChunk(f"{i:064x}", content or f"c{i:063x}", torch.arange(tokens) + i, i * tokens, {"kv": kv})


def chunk_bytes(shape: tuple[int, int, int, int] = SHAPE) -> int:
    return make_chunk(0, shape).nbytes()


def store(chunks_in_ram: float, tmp: Path | None = None, disk_chunks: float = 0, **kw) -> TieredChunkStore:
    disk = DiskTier(tmp, int(disk_chunks * len(seal(make_chunk(0))))) if tmp is not None else None
    return TieredChunkStore(int(chunks_in_ram * chunk_bytes()), disk=disk, **kw)


# -- codecs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_codec_is_exact(dtype: torch.dtype) -> None:
    chunk = make_chunk(1, dtype=dtype)
    out = dense_kv(StoredChunk.from_bytes(chunk.to_bytes()), "cpu", dtype)
    assert out.dtype == dtype and torch.equal(out, chunk.tensors["kv"])


def _error_bound(kv: torch.Tensor, bits: int) -> torch.Tensor:
    """Per element: half a step of its group + the float16 rounding of the group's scale and min
    (keys: groups of GROUP_SIZE tokens per channel, last group padded with the last token;
    values: groups of GROUP_SIZE channels per token, or all channels)."""
    levels = 2**bits - 1
    keys, values = kv[:, 0], kv[:, 1]
    tokens, dim = keys.shape[-2:]
    pad = -tokens % GROUP_SIZE
    padded = torch.cat([keys, keys[..., -1:, :].expand(*keys.shape[:-2], pad, dim)], -2)
    groups = padded.reshape(*keys.shape[:2], -1, GROUP_SIZE, dim)
    k_low, k_high = groups.amin(-2, keepdim=True), groups.amax(-2, keepdim=True)
    vg = GROUP_SIZE if dim % GROUP_SIZE == 0 else dim
    vgroups = values.reshape(*values.shape[:3], -1, vg)
    v_low, v_high = vgroups.amin(-1, keepdim=True), vgroups.amax(-1, keepdim=True)

    def bound(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        span = high - low
        return span / (2 * levels) + (span + low.abs()) * 2.0**-10

    kb = bound(k_low, k_high).expand_as(groups).reshape(*keys.shape[:2], -1, dim)[..., :tokens, :]
    vb = bound(v_low, v_high).expand_as(vgroups).reshape(values.shape)
    return torch.stack([kb, vb], 1)


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(2, 2, 64, 32), (3, 1, 37, 48), (1, 2, 1, 16)])
def test_quantized_codec_error_within_half_a_step(codec: str, shape: tuple[int, int, int, int]) -> None:
    chunk = make_chunk(2, shape)
    kv = chunk.tensors["kv"] * torch.linspace(0.1, 4.0, shape[-1])  # channel outliers, as real keys have
    encoded = StoredChunk(chunk.prefix_hash, chunk.content_hash, chunk.token_ids, 0, encode_chunk(kv, codec), codec)
    decoded = StoredChunk.from_bytes(encoded.to_bytes())
    assert kv_shape(decoded) == (shape[0], shape[1], shape[2], shape[3])
    out = dense_kv(decoded, "cpu", torch.float32)
    assert out.shape == kv.shape
    assert ((out - kv).abs() <= _error_bound(kv, BITS[codec])).all()
    if shape[2] % GROUP_SIZE == 0 and shape[3] % GROUP_SIZE == 0:  # no padding: the nominal ratio
        assert encoded.nbytes() < kv.numel() * kv.element_size() * {"int8": 0.3, "int4": 0.17}[codec]


def test_malformed_chunks_are_refused() -> None:
    chunk = make_chunk(3)
    bad_shape = StoredChunk("p", "c", chunk.token_ids[:5], 0, chunk.tensors)
    with pytest.raises(ChunkFormatError, match="kv must be"):
        kv_shape(bad_shape)
    encoded = encode_chunk(chunk.tensors["kv"], "int4")
    del encoded["value.zero"]
    with pytest.raises(ChunkFormatError, match="needs tensors"):
        kv_shape(StoredChunk("p", "c", chunk.token_ids, 0, encoded, "int4"))
    with pytest.raises(ChunkFormatError, match="unknown codec"):
        kv_shape(StoredChunk("p", "c", chunk.token_ids, 0, chunk.tensors, "int3"))


# -- RAM tier -------------------------------------------------------------------------------------


def test_budget_and_lfu_eviction_order() -> None:
    s = store(3)
    a, b, c, d = (make_chunk(i) for i in range(4))
    for chunk in (a, b, c):
        s.put(chunk)
    s.get(a.prefix_hash), s.get(a.prefix_hash), s.get(b.prefix_hash)  # hits: a 3, b 2, c 1
    s.put(d)  # evicts c: fewest hits
    assert [s.contains(x.prefix_hash) for x in (a, b, c, d)] == [True, True, False, True]
    s.put(c)  # d and c have 1 hit each; d is older -> d goes
    assert [s.contains(x.prefix_hash) for x in (a, b, c, d)] == [True, True, True, False]
    stats = s.stats()
    assert stats["evictions"] == 2 and stats["ram"]["bytes"] == 3 * chunk_bytes() <= stats["ram"]["budget_bytes"]
    assert stats["hits"] == 3 and s.get(d.prefix_hash) is None and s.stats()["misses"] == 1


def test_aging_lets_a_once_popular_chunk_go() -> None:
    s = store(2)
    old = make_chunk(0)
    s.put(old)
    for _ in range(10):
        s.get(old.prefix_hash)
    for i in range(1, 40):  # a stream of new chunks, each used a few times
        s.put(make_chunk(i))
        for _ in range(3):
            s.get(make_chunk(i).prefix_hash)
    assert not s.contains(old.prefix_hash)


def test_content_index_and_index_stage() -> None:
    config = kvpatch.load_config({"name": "t", "stages": [
        {"kind": "index", "impl": "fibonacci"},
        {"kind": "store", "impl": "memory", "params": {"budget_bytes": 10 * chunk_bytes()}}]})
    pipeline = Pipeline(config)
    s = pipeline.stages[-1]
    first, second = make_chunk(1, content="shared"), make_chunk(2, content="shared")
    s.put(first)
    s.put(second)
    assert s.get_by_content("shared").prefix_hash == second.prefix_hash
    assert s.get_by_content("nothing") is None
    assert pipeline.stats()["index/fibonacci"]["size"] == 2  # the config's index holds the RAM slots


def test_quantized_store_and_lossless_flag() -> None:
    s = store(100, codec="int8")
    chunk = make_chunk(5, (2, 2, 64, 32))
    s.put(chunk)
    got = s.get(chunk.prefix_hash)
    assert got.codec == "int8" and got.nbytes() < chunk.nbytes() / 3
    assert torch.allclose(dense_kv(got, "cpu", torch.float32), chunk.tensors["kv"], atol=0.05)
    with pytest.raises(kvpatch.ConfigError, match="lossy: store/memory"):
        kvpatch.load_config({"name": "t", "stages": [{"kind": "store", "impl": "memory", "params": {"codec": "int4"}}]})


def test_store_keeps_its_own_copy() -> None:
    s = store(10)
    chunk = make_chunk(6)
    view = StoredChunk(chunk.prefix_hash, chunk.content_hash, chunk.token_ids, 0,
                       {"kv": torch.cat([chunk.tensors["kv"]] * 2, 3)[:, :, :, :16]})  # a view of a bigger tensor
    s.put(view)
    view.tensors["kv"].zero_()
    assert torch.equal(s.get(chunk.prefix_hash).tensors["kv"], chunk.tensors["kv"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_on_cuda() -> None:
    s = store(10)
    s.put(make_chunk(7))
    got = s.get(make_chunk(7).prefix_hash)
    assert got.tensors["kv"].is_pinned()
    assert torch.equal(dense_kv(got, "cuda", torch.float32).cpu(), make_chunk(7).tensors["kv"])


# -- disk tier ------------------------------------------------------------------------------------


def test_spill_to_disk_and_promote(tmp_path: Path) -> None:
    s = store(1, tmp_path, disk_chunks=10)
    a, b = make_chunk(1), make_chunk(2)
    s.put(a)
    s.put(b)  # a spills
    assert (s.disk.directory / chunk_file_name(a.prefix_hash)).is_file() and s.contains(a.prefix_hash)
    got = s.get(a.prefix_hash)  # promoted back; b spills
    assert torch.equal(got.tensors["kv"], a.tensors["kv"])
    stats = s.stats()
    assert stats["promotions"] == 1 and stats["hits_by_tier"] == {"ram": 0, "disk": 1}
    assert stats["spills"] == 2 and stats["disk"]["bytes"] == 2 * len(seal(a))
    assert s.get_by_content(b.content_hash).prefix_hash == b.prefix_hash  # content index of the disk tier
    # a later process finds the directory warm
    later = store(1, tmp_path, disk_chunks=10)
    assert later.get(a.prefix_hash) is not None and later.get_by_content(b.content_hash) is not None


def test_disk_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 3 * len(seal(make_chunk(0))))
    for i in range(3):
        tier.write(make_chunk(i))
        time.sleep(0.01)
    tier.read(make_chunk(0).prefix_hash)  # touch: 1 is now the least recently used
    time.sleep(0.01)
    tier.write(make_chunk(3))
    assert [tier.contains(make_chunk(i).prefix_hash) for i in range(4)] == [True, False, True, True]
    assert tier.stats()["bytes"] == folder_chunk_bytes(tier.directory) <= tier.budget_bytes


@pytest.mark.parametrize("damage", ["flip", "truncate", "unsealed", "garbage"])
def test_damaged_chunk_file_is_refused(tmp_path: Path, damage: str) -> None:
    tier = DiskTier(tmp_path, 10**8)
    chunk = make_chunk(1)
    tier.write(chunk)
    path = tier.path(chunk.prefix_hash)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "unsealed":
        data = bytearray(chunk.to_bytes())
    else:
        data = bytearray(b"not a chunk at all")
    path.write_bytes(bytes(data))
    expected = {"flip": "checksum mismatch", "truncate": "truncated", "unsealed": "no 'kvpatch.chunk.sha256'",
                "garbage": "header length"}[damage]
    with pytest.raises(ChunkFormatError, match=expected):
        tier.read(chunk.prefix_hash)
    assert not path.exists()  # refused once, then gone
    path.write_bytes(bytes(data))
    s = TieredChunkStore(10**8, disk=tier)
    with pytest.warns(RuntimeWarning, match=expected):
        assert s.get(chunk.prefix_hash) is None
    assert s.stats()["corrupt"] == 1 and s.stats()["misses"] == 1


def test_every_single_byte_flip_is_refused() -> None:
    data = seal(make_chunk(4, (1, 1, 4, 4)))
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x01
        try:
            unseal(bytes(damaged), "fuzz")
        except ChunkFormatError:
            continue
        pytest.fail(f"a flipped byte at {i} was loaded")
    assert unseal(data, "ok").prefix_hash == make_chunk(4).prefix_hash


def _write_forever(directory: str, kv: torch.Tensor, wrote: Any) -> None:
    """Rewrite one key forever. No tensor math here: a forked child must not enter torch's
    thread pool (OpenMP can deadlock after fork), so the parent made `kv`."""
    tier = DiskTier(directory, 10**9)
    for i in range(1, 10**9):
        tier.write(StoredChunk("k", "c", torch.arange(512), i, {"kv": kv}))
        wrote.set()


def test_kill_during_writes_never_leaves_a_torn_chunk(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    killed_mid_write = 0
    for attempt in range(40):  # at least 8 kills, and until one landed inside a write
        if attempt >= 8 and killed_mid_write:
            break
        wrote = ctx.Event()
        kv = torch.full((8, 2, 4, 512, 64), float(attempt))
        writer = ctx.Process(target=_write_forever, args=(str(tmp_path), kv, wrote))
        writer.start()
        assert wrote.wait(60)  # at least one whole write, then kill at some point of a later one
        time.sleep(0.008 * (attempt % 10))  # spans a few write cycles (serialize, then the temp file)
        writer.kill()  # SIGKILL: no cleanup runs
        writer.join()
        folder = tmp_path / SUBDIR
        killed_mid_write += any(p.name.endswith(".tmp") for p in folder.iterdir())
        tier = DiskTier(tmp_path, 10**9)  # opening collects the dead writer's temp file
        chunk = tier.read("k")  # one whole write of this attempt, never a torn or mixed file
        assert torch.equal(chunk.tensors["kv"], kv) and chunk.start >= 1
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert killed_mid_write > 0


def _concurrent_writer(directory: str, worker: int, budget: int, chunks: list[StoredChunk]) -> None:
    tier = DiskTier(directory, budget)
    for i in range(24):
        key = (worker * 7 + i) % len(chunks)  # workers overlap on keys
        tier.write(chunks[key])
        tier.read(chunks[(key + 3) % len(chunks)].prefix_hash)


def test_concurrent_writers_share_a_directory(tmp_path: Path) -> None:
    budget = 10 * len(seal(make_chunk(0)))
    ctx = multiprocessing.get_context("fork")
    chunks = [make_chunk(i) for i in range(16)]  # made here: no tensor math in forked children
    workers = [ctx.Process(target=_concurrent_writer, args=(str(tmp_path), w, budget, chunks)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    tier = DiskTier(tmp_path, budget)
    keys = tier.prefix_hashes()
    assert keys and not [p for p in tier.directory.iterdir() if p.name.endswith(".tmp")]
    for key in keys:
        index = int(key, 16)
        assert torch.equal(tier.read(key).tensors["kv"], make_chunk(index).tensors["kv"])
    assert folder_chunk_bytes(tier.directory) <= budget  # the last writer's turn saw every other file


def folder_chunk_bytes(folder: Path) -> int:
    """What the chunk files of a tier folder really take (the lock file is not a chunk)."""
    return sum(p.stat().st_size for p in folder.iterdir() if FILE_NAME.fullmatch(p.name))


def test_tiers_sharing_a_folder_keep_its_budget_after_every_write(tmp_path: Path) -> None:
    """Each tier counts the files the others wrote (it recounts when the folder's write generation
    moved): two tiers writing in turns never hold more than one budget between them."""
    budget = 3 * len(seal(make_chunk(0)))
    tiers = [DiskTier(tmp_path, budget), DiskTier(tmp_path, budget)]
    for i in range(12):
        tiers[i % 2].write(make_chunk(i))
        assert folder_chunk_bytes(tiers[0].directory) <= budget, i
    assert sum(t.evictions for t in tiers) == 12 - 3
    newest = {int(k, 16) for k in tiers[0].prefix_hashes()}
    assert newest == {9, 10, 11}  # least recently used went first, whoever wrote them


# -- chunk-store snapshots ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


def model_shape(model: torch.nn.Module, tokens: int = 20) -> tuple[int, int, int, int]:
    c = model.config
    return c.num_hidden_layers, c.num_key_value_heads, tokens, c.hidden_size // c.num_attention_heads


@pytest.mark.parametrize("codec", ["dense", "int4"])
def test_store_snapshot_round_trip(tmp_path: Path, model: torch.nn.Module, codec: str) -> None:
    config = kvpatch.load_config("default")
    source = TieredChunkStore(10**8, codec, disk=DiskTier(tmp_path / "disk", 10**8))
    chunks = [make_chunk(i, model_shape(model)) for i in range(6)]
    for chunk in chunks:
        source.put(chunk)
    source.flush()
    source.disk.write(make_chunk(50, model_shape(model)))  # only on disk: exported too
    path = export_store(tmp_path / "store.safetensors", source, model, config)
    metadata = read_metadata(path)
    assert metadata.kind == "chunk_store" and len(metadata.chunks) == 7
    target = TieredChunkStore(10**8)
    assert import_store(path, target, model, config) == 7
    for chunk in chunks:
        assert torch.equal(dense_kv(target.get(chunk.prefix_hash), "cpu", torch.float32),
                           dense_kv(source.get(chunk.prefix_hash), "cpu", torch.float32))
        assert target.get(chunk.prefix_hash).codec == codec


def test_store_snapshot_refusals(tmp_path: Path, model: torch.nn.Module) -> None:
    config = kvpatch.load_config("default")
    s = TieredChunkStore(10**8)
    s.put(make_chunk(1, model_shape(model)))
    path = export_store(tmp_path / "store.safetensors", s, model, config)
    other = tiny_model("llama", seed=1)
    with pytest.raises(SnapshotMismatchError, match="model.weights"):
        import_store(path, TieredChunkStore(10**8), other, config)
    with pytest.raises(SnapshotMismatchError, match="pipeline.digest"):
        import_store(path, TieredChunkStore(10**8), model, kvpatch.load_config("compiled"))
    with pytest.raises(SnapshotMismatchError, match="kind mismatch"):
        kvpatch.snapshot.load_snapshot(path, model, Pipeline(config))
    wrong = TieredChunkStore(10**8)
    wrong.put(make_chunk(2))  # not this model's shape
    bad = export_store(tmp_path / "bad.safetensors", wrong, model, config)
    with pytest.raises(SnapshotMismatchError, match="layers, kv_heads, head_dim"):
        read_store_snapshot(bad, model)
    outside = TieredChunkStore(10**8)
    chunk = make_chunk(3, model_shape(model))
    chunk.token_ids[-1] = model.config.vocab_size  # one past the vocabulary
    outside.put(chunk)
    with pytest.raises(SnapshotMismatchError, match=r"chunks.0.token_ids \(token id range\)"):
        read_store_snapshot(export_store(tmp_path / "vocab.safetensors", outside, model, config), model)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    target = TieredChunkStore(10**8)
    with pytest.raises(SnapshotCorruptError, match="content checksum mismatch"):
        import_store(path, target, model, config)
    assert target.stats()["puts"] == 0  # nothing is imported from a file that fails a check


def test_the_content_index_forgets_evicted_files(tmp_path: Path) -> None:
    """Long-running processes: the disk tier's content index holds what the folder holds, not
    every chunk ever written (found by tools/soak.py: one entry per spill, never pruned)."""
    tier = DiskTier(tmp_path, 3 * len(seal(make_chunk(0))))
    for i in range(40):
        tier.write(make_chunk(i))
    assert len(tier._by_content) == len(tier.prefix_hashes()) == 3
    assert tier.read_by_content(make_chunk(39).content_hash) is not None
    assert tier.read_by_content(make_chunk(0).content_hash) is None
    tier.remove(make_chunk(39).prefix_hash)
    assert len(tier._by_content) == 2
