"""Chunk-key algorithms of `hasher/chained` (kvpatch/reuse/chunk_hash.py): each algorithm computes
the documented digest (docs/serving.md), keys of two algorithms never collide and a chunk hashed
one way is foreign to a store bound to another, a missing optional package is a ConfigError that
names it, xxhash keys stay in RAM (config validation, store binding and snapshots refuse them
elsewhere), and reuse with blake3 is exact."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

import kvpatch
from kvpatch.config import validate_config
from kvpatch.errors import ConfigError
from kvpatch.reuse.chunk import StoredChunk
from kvpatch.reuse.chunk_hash import KEY_TAGS, ChunkHasher, token_bytes
from kvpatch.reuse.disk_tier import DiskTier
from kvpatch.reuse.memory_store import TieredChunkStore
from kvpatch.snapshot import export_store, import_store
from kvpatch.stage_specs.reuse import SHAREABLE_ALGORITHMS
from kvpatch.testing import tiny_model

ALGORITHMS = ("sha256", "blake2b", "blake3", "xxhash")
TOKENS = list(range(100, 116))


def documented_digest(algorithm: str, data: bytes) -> str:
    """docs/serving.md, "Keys": H as lowercase hex after the algorithm's tag (none for sha256)."""
    import blake3
    import xxhash

    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    if algorithm == "blake2b":
        return "blake2b:" + hashlib.blake2b(data, digest_size=32).hexdigest()
    if algorithm == "blake3":
        return "blake3:" + blake3.blake3(data).hexdigest()
    return "xxh3:" + xxhash.xxh3_128_hexdigest(data)


def bound_chunk(hasher: ChunkHasher, ids: list[int]) -> StoredChunk:
    data = token_bytes(ids)
    return StoredChunk(hasher.prefix_hash(hasher.namespace, data), hasher.content_hash(data),
                       torch.tensor(ids, dtype=torch.int64), 0, {"kv": torch.zeros(1, 2, 1, len(ids), 4)},
                       namespace=hasher.namespace, parent_hash=hasher.namespace)


def reuse_config(algorithm: str, **store: object) -> dict:
    return {"name": f"reuse-{algorithm}", "stages": [
        {"kind": "chunker", "impl": "fixed", "params": {"size": 8}},
        {"kind": "hasher", "impl": "chained", "params": {"algorithm": algorithm}},
        {"kind": "matcher", "impl": "exact"},
        {"kind": "store", "impl": "memory", "params": {"budget_bytes": 2**26, **store}},
    ]}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_computes_the_documented_keys(algorithm: str) -> None:
    hasher = ChunkHasher("ns", algorithm)
    namespace = documented_digest(algorithm, b"kvpatch-chunk-namespace\0ns")
    first = documented_digest(algorithm, b"prefix\0" + namespace.encode() + b"\0" + token_bytes(TOKENS[:8]))
    second = documented_digest(algorithm, b"prefix\0" + first.encode() + b"\0" + token_bytes(TOKENS[8:]))
    content = documented_digest(algorithm, b"content\0" + namespace.encode() + b"\0" + token_bytes(TOKENS[8:]))
    assert hasher.namespace == namespace
    prefixes, contents = hasher.hashes(TOKENS, [(0, 8), (8, 16)])
    assert prefixes == [first, second] and contents[1] == content
    assert hasher.shareable == (algorithm != "xxhash")


def test_sha256_keys_are_unchanged() -> None:
    """The default's keys are every stored chunk's keys: a change would orphan every store."""
    hasher = ChunkHasher("pinned-namespace")
    assert hasher.namespace == "01d06d12b9fbac24818b3fc88d3bc49c2a7cc537972fb84793a60b30541627b6"
    assert hasher.hashes(list(range(16)), [(0, 8), (8, 16)])[0] == [
        "81989ec32a72c63d8a96f2c06b2f4905b9464c00fde6a4055a996c91aca54a74",
        "cc50c55acdb4e1236b9128ac88c94537d307a371dfb7f347504e23de3331c765"]


def test_keys_never_collide_across_algorithms_and_chunks_are_foreign_to_other_hashers() -> None:
    hashers = {a: ChunkHasher("ns", a) for a in ALGORITHMS}
    keys = {a: [h.namespace, *h.hashes(TOKENS, [(0, 8), (8, 16)])[0], *h.hashes(TOKENS, [(0, 8)])[1]]
            for a, h in hashers.items()}
    every = [k for ks in keys.values() for k in ks]
    assert len(set(every)) == len(every)
    for algorithm, ks in keys.items():  # the tag alone keeps them apart, whatever the digests
        tag = KEY_TAGS[algorithm]
        assert all(k.startswith(tag) and all(c in "0123456789abcdef" for c in k[len(tag):]) for k in ks)
        others = [t for a, t in KEY_TAGS.items() if a != algorithm and t]
        assert not any(k.startswith(t) for k in ks for t in others)
    for reader, hasher in hashers.items():
        store = TieredChunkStore(2**26, pin_memory=False)
        store.bind(hasher, None)
        assert store.put(bound_chunk(hasher, TOKENS[:8]))
        with pytest.warns(RuntimeWarning, match="namespace"):  # once per store and reason
            for writer, other in hashers.items():
                if writer == reader:
                    continue
                chunk = bound_chunk(other, TOKENS[:8])
                assert "namespace" in hasher.binding_problem(chunk)
                assert store.put(chunk) is False
                assert store.get(chunk.prefix_hash) is None
        assert store.stats()["foreign"] == len(ALGORITHMS) - 1


def test_chunks_of_the_untagged_blake2b_keys_are_refused() -> None:
    """blake2b keys had no tag before blake3 came; such chunks are foreign now, never misread."""
    def old(data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=32).hexdigest()

    namespace = old(b"kvpatch-chunk-namespace\0ns")
    data = token_bytes(TOKENS[:8])
    chunk = StoredChunk(old(b"prefix\0" + namespace.encode() + b"\0" + data),
                        old(b"content\0" + namespace.encode() + b"\0" + data), torch.tensor(TOKENS[:8]), 0,
                        {"kv": torch.zeros(1, 2, 1, 8, 4)}, namespace=namespace, parent_hash=namespace)
    store = TieredChunkStore(2**26, pin_memory=False)
    store.bind(ChunkHasher("ns", "blake2b"), None)
    with pytest.warns(RuntimeWarning, match="namespace"):
        assert store.put(chunk) is False


@pytest.mark.parametrize("algorithm", ["blake3", "xxhash"])
def test_missing_package_is_a_config_error_naming_it(algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, algorithm, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=rf"needs the {algorithm} package: pip install {algorithm}.*fast-hash"):
        ChunkHasher("ns", algorithm)
    model = tiny_model("llama")
    attention = model.config._attn_implementation
    with pytest.raises(ConfigError, match=f"pip install {algorithm}"):
        kvpatch.apply(model, reuse_config(algorithm))
    assert getattr(model, "_kvpatch_handle", None) is None  # the model is left as it was
    assert model.config._attn_implementation == attention


def test_config_validation_knows_the_algorithms() -> None:
    for algorithm in ALGORITHMS:
        validate_config(reuse_config(algorithm))
    with pytest.raises(ConfigError, match="algorithm"):
        validate_config(reuse_config("md5"))


@pytest.mark.parametrize("tier", [{"disk": {"path": "chunks"}}, {"redis": {"url": "redis://127.0.0.1:6379/0"}}])
def test_xxhash_keys_are_refused_for_persisted_or_shared_tiers(tier: dict, tmp_path: Path) -> None:
    if "disk" in tier:
        tier = {"disk": {"path": str(tmp_path / "chunks")}}
    name = next(iter(tier))
    with pytest.raises(ConfigError, match=rf"'xxhash' is not collision resistant.*{name} tier"):
        validate_config(reuse_config("xxhash", **tier))
    for algorithm in SHAREABLE_ALGORITHMS:
        validate_config(reuse_config(algorithm, **tier))
    validate_config(reuse_config("xxhash"))  # RAM only: allowed


def test_xxhash_store_with_a_lower_tier_or_a_snapshot_is_refused(tmp_path: Path) -> None:
    """The runtime checks behind the config's: a store built in Python, and snapshots."""
    store = TieredChunkStore(2**26, pin_memory=False, disk=DiskTier(tmp_path / "chunks", 2**26))
    with pytest.raises(ConfigError, match="disk tier"):
        store.bind(ChunkHasher("ns", "xxhash"), None)
    assert store.hasher is None
    store.bind(ChunkHasher("ns", "blake3"), None)
    ram = TieredChunkStore(2**26, pin_memory=False)
    ram.bind(ChunkHasher("ns", "xxhash"), None)
    assert ram.put(bound_chunk(ram.hasher, TOKENS[:8]))
    with pytest.raises(ConfigError, match="chunk-store snapshot"):
        export_store(tmp_path / "s.safetensors", ram, None, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="chunk-store snapshot"):
        import_store(tmp_path / "s.safetensors", ram)
    assert not (tmp_path / "s.safetensors").exists()


def test_blake3_reuse_round_trip_is_exact() -> None:
    reference, model = tiny_model("llama"), tiny_model("llama")
    handle = kvpatch.apply(model, reuse_config("blake3"))
    assert handle.reuse.hasher.algorithm == "blake3" and handle.reuse.store.namespace.startswith("blake3:")
    first = torch.randint(5, 300, (1, 37), generator=torch.Generator().manual_seed(1))
    shared = torch.cat([first[:, :30], torch.randint(5, 300, (1, 9), generator=torch.Generator().manual_seed(2))], 1)

    def greedy(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False)

    for ids, reused in ((first, 0), (shared, 24), (first, 36)):
        assert torch.equal(greedy(model, ids), greedy(reference, ids))
        assert handle.reuse.last.reused_tokens == reused
    stats = handle.reuse.store.stats()
    assert stats["hits"] > 0 and stats["foreign"] == 0
    assert all(c.prefix_hash.startswith("blake3:") for c in handle.reuse.store.iter_chunks())
