"""kvpatch.hashing: Fibonacci hash, the open-addressing index, its tensor twin, fibkvc compat, stages."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpatch
from kvpatch.hashing import fibonacci as fibonacci_module
from kvpatch.hashing import (
    EMPTY,
    GOLDEN_MULTIPLIER,
    FibonacciCacheOptimizer,
    FibonacciHashingConfig,
    HashIndex,
    IndexConfig,
    TensorIndex,
    fibonacci_hash,
    fibonacci_hash_tensor,
    keys_tensor,
    modulo_hash,
)

FAST = settings(max_examples=50, deadline=None)
U64 = st.integers(min_value=0, max_value=2**64 - 1)
INT64 = st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
KEYS = st.one_of(U64, st.binary(min_size=0, max_size=40))
TABLE_SIZES = st.integers(min_value=0, max_value=40).map(lambda bits: 1 << bits)


# -- the hash functions --------------------------------------------------------------------------


@FAST
@given(key=st.one_of(st.integers(), st.text(), st.binary()), table_size=TABLE_SIZES)
def test_hash_indices_in_range(key: object, table_size: int) -> None:
    assert 0 <= fibonacci_hash(key, table_size) < table_size  # type: ignore[arg-type]
    assert 0 <= modulo_hash(key, table_size) < table_size  # type: ignore[arg-type]


def test_hash_values_are_knuths_integer_form() -> None:
    assert fibonacci_hash(1, 1 << 16) == GOLDEN_MULTIPLIER >> 48 == 0x9E37
    assert fibonacci_hash(2, 1 << 8) == ((2 * GOLDEN_MULTIPLIER) % 2**64) >> 56
    assert fibonacci_hash(-1, 1 << 10) == fibonacci_hash(2**64 - 1, 1 << 10)
    assert fibonacci_hash(12345, 1) == 0
    assert modulo_hash(1000, 256) == 1000 % 256 and modulo_hash(-1, 16) == 15
    assert fibonacci_hash("token_42", 512) == fibonacci_hash(b"token_42", 512)


@pytest.mark.parametrize("bad", [0, 3, 6, 100, -4, 2.0, True, "256"])
def test_non_power_of_two_table_sizes_rejected(bad: object) -> None:
    for fn in (fibonacci_hash, modulo_hash):
        with pytest.raises(ValueError, match=rf"table_size must be a power-of-two int >= 1, got {bad!r}"):
            fn(7, bad)  # type: ignore[arg-type]


def test_unhashable_key_types_rejected() -> None:
    with pytest.raises(TypeError, match="int, str or bytes"):
        fibonacci_hash(1.5, 16)  # type: ignore[arg-type]


def test_fibonacci_spreads_strided_keys_that_modulo_piles_up() -> None:
    for stride_bits in (8, 12, 16):
        keys = [i << stride_bits for i in range(1024)]
        assert len({modulo_hash(k, 1024) for k in keys}) <= 1024 >> min(stride_bits, 10)
        assert len({fibonacci_hash(k, 1024) for k in keys}) > 600


def test_hashes_are_deterministic_across_processes() -> None:
    keys = [0, 1, 2**63, 2**64 - 1, -5, "token_42", "ünïcode", b"", b"\x00\xffchunk"]
    table_sizes = [1, 2, 256, 1 << 20]
    # The module alone (stdlib only), so the child skips importing torch and transformers.
    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('fib', sys.argv[1])\n"
        "fib = importlib.util.module_from_spec(spec); spec.loader.exec_module(fib)\n"
        "keys = [0, 1, 2**63, 2**64 - 1, -5, 'token_42', 'ünïcode', b'', b'\\x00\\xffchunk']\n"
        "print(json.dumps([[f(k, n) for f in (fib.fibonacci_hash, fib.modulo_hash) for n in (1, 2, 256, 1 << 20)]"
        " for k in keys]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script, fibonacci_module.__file__], env=env, capture_output=True,
                         text=True, check=True).stdout
    here = [[f(k, n) for f in (fibonacci_hash, modulo_hash) for n in table_sizes] for k in keys]
    assert json.loads(out) == here


# -- the Python index ----------------------------------------------------------------------------


@FAST
@given(entries=st.dictionaries(KEYS, st.integers(0, 2**40), max_size=300),
       method=st.sampled_from(["fibonacci", "modulo"]), capacity=st.sampled_from([1, 2, 16]))
def test_every_inserted_key_is_found(entries: dict, method: str, capacity: int) -> None:
    index = HashIndex(IndexConfig(initial_capacity=capacity, hash=method))
    for key, value in entries.items():
        index.put(key, value)
    assert len(index) == len(entries)
    assert all(index.get(key) == value and key in index for key, value in entries.items())
    assert dict(index.items()) == entries and set(index) == set(entries)
    assert index.load_factor <= 0.75 and index.capacity & (index.capacity - 1) == 0


@FAST
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "put", "delete", "get"]), st.integers(0, 12), st.integers(0, 9)),
                    max_size=200),
       method=st.sampled_from(["fibonacci", "modulo"]))
def test_index_behaves_like_a_dict(ops: list, method: str) -> None:
    # Odd raws become multiples of 4096, which modulo hashing sends to one home slot (long
    # chains); even raws stay small, so chains run over keys sitting at their own homes.
    index, model = HashIndex(IndexConfig(initial_capacity=4, hash=method)), {}
    for op, raw, value in ops:
        key = raw << 12 if raw % 2 else raw
        if op == "put":
            index.put(key, value)
            model[key] = value
        elif op == "delete":
            assert index.delete(key) == (model.pop(key, None) is not None)
        else:
            assert index.get(key) == model.get(key)
        assert len(index) == len(model)
    assert dict(index.items()) == model and all(index.get(key) == value for key, value in model.items())


def test_delete_inside_a_probe_chain_keeps_the_rest_reachable() -> None:
    index = HashIndex(IndexConfig(initial_capacity=64, hash="modulo"))
    keys = [i * 1024 for i in range(10)]  # one home slot: a chain of ten
    for value, key in enumerate(keys):
        index.put(key, value)
    assert index.stats()["max_probe_length"] == 10
    assert index.delete(keys[3]) and not index.delete(keys[3])
    assert keys[3] not in index and index.get(keys[3]) is None
    assert [index.get(k) for k in keys if k != keys[3]] == [v for v, k in enumerate(keys) if k != keys[3]]
    assert index.stats()["max_probe_length"] == 9, "backward shift must close the hole"
    assert sorted(index.probe_lengths()) == list(range(1, 10))


def test_delete_never_moves_a_key_before_its_home() -> None:
    index = HashIndex(IndexConfig(initial_capacity=64, hash="modulo"))
    for key in (0, 64, 128, 3, 2, 5):  # slots 0, 1, 2 (home 0); 3 (home 3); 4 (home 2); 5 (home 5)
        index.put(key, key)
    assert index.delete(64)
    assert all(index.get(key) == key for key in (0, 128, 3, 2, 5))
    assert [index.locate(key) for key in (0, 128, 2, 3, 5)] == [(0, 1), (1, 2), (2, 1), (3, 1), (5, 1)]


def test_resize_preserves_contents_and_reports() -> None:
    resizes: list[tuple[int, int]] = []
    index = HashIndex(IndexConfig(initial_capacity=4, max_load_factor=0.5),
                      on_resize=lambda old, new: resizes.append((old, new)))
    for key in range(100):
        index.put(key, key * 2)
    assert resizes == [(4, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 256)]
    assert index.capacity == 256 and index.stats()["resizes"] == 6
    assert all(index.get(key) == key * 2 for key in range(100))
    sparse = HashIndex(IndexConfig(initial_capacity=1, max_load_factor=0.01),
                       on_resize=lambda old, new: resizes.append((old, new)))
    sparse.put(5, 5)
    assert resizes[-1] == (1, 128) and sparse.load_factor <= 0.01 and sparse.get(5) == 5


def test_statistics_and_collision_callback() -> None:
    seen: list[tuple[int, int]] = []
    index = HashIndex(IndexConfig(initial_capacity=16, hash="modulo", timing=True),
                      on_collision=lambda key, slot: seen.append((key, slot)))
    for key in (0, 16, 32, 5):
        index.put(key, key)
    assert seen == [(16, 1), (32, 2)]
    index.put(16, 99)  # an update is not a collision
    assert index.get(16) == 99 and index.get(7) is None and index.get(32) == 32
    stats = index.stats()
    assert stats["collisions"] == 2 and stats["lookups"] == 3 and stats["hits"] == 2
    assert stats["hit_rate"] == pytest.approx(2 / 3) and stats["mean_lookup_ns"] > 0
    assert stats["max_probe_length"] == 3 and stats["mean_probe_length"] == pytest.approx((1 + 2 + 3 + 1) / 4)
    assert stats["load_factor"] == 4 / 16
    assert HashIndex().stats()["mean_lookup_ns"] is None


def test_index_rejects_bad_keys_values_and_config() -> None:
    index = HashIndex()
    for bad_key in (1.5, "text", True, None):
        with pytest.raises(TypeError, match="int or bytes"):
            index.put(bad_key, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int store slots"):
        index.put(1, "slot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="power-of-two"):
        IndexConfig(initial_capacity=24)
    with pytest.raises(ValueError, match="less than 1"):
        IndexConfig(max_load_factor=1.0)
    with pytest.raises(ValueError, match="hash"):
        IndexConfig(hash="crc")  # type: ignore[arg-type]


# -- persistence ---------------------------------------------------------------------------------


@FAST
@given(entries=st.dictionaries(KEYS, st.integers(-(2**70), 2**70), max_size=200),
       method=st.sampled_from(["fibonacci", "modulo"]))
def test_json_round_trip_rebuilds_the_same_table(entries: dict, method: str) -> None:
    index = HashIndex(IndexConfig(initial_capacity=8, hash=method))
    for key, value in entries.items():
        index.put(key, value)
    restored = HashIndex.from_json(index.to_json())
    assert restored.config == index.config and restored.capacity == index.capacity
    assert list(restored.items()) == list(index.items()), "same slots, not just the same mapping"
    restored.put(b"new", 1)
    assert restored.get(b"new") == 1


def test_save_load_is_atomic_and_round_trips(tmp_path: Path) -> None:
    index = HashIndex(IndexConfig(initial_capacity=32))
    for key in range(50):
        index.put(key * 7919, key)
    index.put(bytes(range(32)), 7)
    path = tmp_path / "index.json"
    path.write_text("old contents")
    index.save(path)
    assert os.listdir(tmp_path) == ["index.json"], "no temp file left behind"
    loaded = HashIndex.load(path)
    assert dict(loaded.items()) == dict(index.items()) and loaded.get(bytes(range(32))) == 7


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    index = HashIndex()
    for key in range(5):
        index.put(key, key + 100)
    path = tmp_path / "index.json"
    index.save(path)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda text, doc: text[: len(text) // 2], "not valid JSON"),
        (lambda text, doc: text.replace(",104]", ",105]"), "checksum mismatch"),
        (lambda text, doc: json.dumps({**doc, "format": "other"}), "not a kvpatch hash index"),
        (lambda text, doc: json.dumps({**doc, "version": 99}), "version 99 is not supported"),
        (lambda text, doc: json.dumps({"x": 1}), "not a kvpatch hash index"),
    ],
)
def test_corrupt_files_are_refused(tmp_path: Path, corrupt, message: str) -> None:
    path, doc = _saved(tmp_path)
    assert ",104]" in path.read_text()
    path.write_text(corrupt(path.read_text(), doc))
    with pytest.raises(ValueError, match=message):
        HashIndex.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda doc: doc.update(capacity=12), "malformed.*power-of-two"),
        (lambda doc: doc["config"].update(max_load_factor=2), "malformed"),
        (lambda doc: doc["entries"].append(["zz", 1]), "malformed"),
        (lambda doc: doc["entries"].append([0, 1]), "repeats a key"),
        (lambda doc: doc.update(capacity=4), "over the load limit"),
    ],
)
def test_mismatched_contents_are_refused_even_with_a_valid_checksum(tmp_path: Path, edit, message: str) -> None:
    from kvpatch.hashing.index import _checksum

    _, doc = _saved(tmp_path)
    doc.pop("checksum")
    edit(doc)
    with pytest.raises(ValueError, match=message):
        HashIndex.from_json(json.dumps({**doc, "checksum": _checksum(doc)}))


def test_binary_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8"):
        HashIndex.load(path)


# -- the tensor index ----------------------------------------------------------------------------


def test_torch_int64_multiplication_wraps_modulo_2_64() -> None:
    a = torch.tensor([2**62, -(2**63) + 1, 3], dtype=torch.int64)
    wrapped = [((x * 5) + 2**63) % 2**64 - 2**63 for x in a.tolist()]
    assert (a * 5).tolist() == wrapped


@FAST
@given(keys=st.lists(INT64, min_size=1, max_size=200), bits=st.integers(0, 30))
def test_tensor_hash_agrees_with_python(keys: list[int], bits: int) -> None:
    hashed = fibonacci_hash_tensor(torch.tensor(keys, dtype=torch.int64), 1 << bits).tolist()
    assert hashed == [fibonacci_hash(key, 1 << bits) for key in keys]


def test_keys_tensor_keeps_the_low_64_bits() -> None:
    keys = [0, 2**63 - 1, 2**63, 2**64 - 1, -7]
    assert keys_tensor(keys).tolist() == [0, 2**63 - 1, -(2**63), -1, -7]
    assert fibonacci_hash_tensor(keys_tensor(keys), 1024).tolist() == [fibonacci_hash(k, 1024) for k in keys]


def _tensor_index_round_trip(device: str) -> None:
    rng = random.Random(1)
    keys = [rng.getrandbits(64) for _ in range(3000)] + [i << 16 for i in range(3000)]
    index = TensorIndex(1 << 13, device=device)
    index.insert_many(keys_tensor(keys[:4000], device), torch.arange(4000))
    index.insert_many(keys_tensor(keys[4000:], device), torch.arange(4000, 6000))
    assert len(index) == 6000 and index.max_probe_length >= 1
    found = index.lookup_many(keys_tensor(keys, device))
    assert found.device.type == device and found.tolist() == list(range(6000))
    misses = keys_tensor([rng.getrandbits(64) | 1 for _ in range(500)], device)  # strided keys are even
    assert set(index.lookup_many(misses).tolist()) <= {-1} | set(range(3000))
    assert index.lookup_many(keys_tensor([5, 2**40 + 3], device)).tolist() == [-1, -1]


def test_tensor_index_finds_all_inserted_keys() -> None:
    _tensor_index_round_trip("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_index_on_cuda() -> None:
    _tensor_index_round_trip("cuda")
    keys = torch.randint(-(2**63) + 1, 2**63 - 1, (10000,), device="cuda")
    assert fibonacci_hash_tensor(keys, 1 << 20).tolist() == [fibonacci_hash(k, 1 << 20) for k in keys.tolist()]


@FAST
@given(keys=st.lists(INT64, min_size=1, max_size=150))
def test_tensor_index_agrees_with_python_index(keys: list[int]) -> None:
    python, tensor = HashIndex(IndexConfig(initial_capacity=256)), TensorIndex(256)
    for value, key in enumerate(keys):
        python.put(key, value)
    tensor.insert_many(torch.tensor(keys, dtype=torch.int64), torch.arange(len(keys)))
    probe = keys + [k ^ 1 for k in keys]
    assert tensor.lookup_many(torch.tensor(probe, dtype=torch.int64)).tolist() == [python.get(k, -1) for k in probe]
    assert len(tensor) == len(python)


def test_tensor_index_updates_duplicates_and_limits() -> None:
    index = TensorIndex(16)
    index.insert_many(torch.tensor([3, 4, 3]), torch.tensor([1, 2, 5]))
    assert len(index) == 2 and index.lookup_many(torch.tensor([3, 4])).tolist() == [5, 2]
    index.insert_many(torch.tensor([4]), [9])
    assert len(index) == 2 and index.lookup_many(torch.tensor([4])).tolist() == [9]
    with pytest.raises(OverflowError, match="capacity 16"):
        index.insert_many(torch.arange(100, 111), torch.zeros(11, dtype=torch.int64))
    assert len(index) == 2 and index.lookup_many(torch.tensor([100])).tolist() == [-1]
    with pytest.raises(ValueError, match="sentinel"):
        index.insert_many(torch.tensor([EMPTY]), [0])
    with pytest.raises(ValueError, match=">= 0"):
        index.insert_many(torch.tensor([8]), [-1])
    with pytest.raises(ValueError, match="int64"):
        index.lookup_many(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="table_size"):
        TensorIndex(100)


# -- fibkvc compatibility ------------------------------------------------------------------------


def test_compat_round_trip_and_statistics(tmp_path: Path) -> None:
    optimizer = FibonacciCacheOptimizer(use_fibonacci=True, initial_table_size=256)
    state = {"entries": {0: "data", 1: "more_data", "chunk-a": [1, 2]}, "model": "tiny", "step": 3}
    text = optimizer.serialize_cache_state(state)
    assert optimizer.deserialize_cache_state(text) == state
    assert {row[0]: row[1] for row in json.loads(text)["entries"]}[1] == optimizer.get_hash_index(1)

    optimizer.save_to_file(state, tmp_path / "snap.json")
    fresh = FibonacciCacheOptimizer(initial_table_size=256)
    assert fresh.load_from_file(tmp_path / "snap.json") == state
    assert fresh.get_hash_index(0) == optimizer.get_hash_index(0)
    assert fresh.get_statistics()["cache_hit_rate"] == 100.0, "loading registers the snapshot's keys"

    first = optimizer.get_hash_index(12345)
    assert 0 <= first < 256 and optimizer.get_hash_index(12345) == first
    stats = optimizer.get_statistics()
    assert stats["num_entries"] == 4 and stats["load_factor"] == 4 / 256
    lookups = stats["monitoring_stats"]["total_lookups"]
    assert stats["monitoring_stats"]["cache_hit_rate"] == pytest.approx(100 * (lookups - 4) / lookups)
    assert stats["avg_lookup_time_ms"] > 0


def test_compat_events_and_modulo_mode() -> None:
    collisions, resizes = [], []
    config = FibonacciHashingConfig(on_collision_callback=collisions.append, on_resize_callback=resizes.append)
    optimizer = FibonacciCacheOptimizer(use_fibonacci=False, initial_table_size=8, config=config)
    assert optimizer.get_hash_index(3) == 3 and optimizer.get_hash_index(11) == 4
    assert collisions == [{"token_position": 11, "hash_index": 4, "chain_length": 2, "table_size": 8}]
    for position in range(20, 31):  # 13 keys: past 0.75 * 16
        optimizer.get_hash_index(position)
    assert [(e["old_size"], e["new_size"]) for e in resizes] == [(8, 16), (16, 32)]
    assert all(e["resize_time_ms"] >= 0 for e in resizes)
    assert optimizer.get_statistics()["collision_count"] == len(collisions)


def test_compat_refuses_bad_input(tmp_path: Path) -> None:
    optimizer = FibonacciCacheOptimizer()
    with pytest.raises(ValueError, match="initial_table_size"):
        FibonacciCacheOptimizer(initial_table_size=100)
    with pytest.raises(ValueError, match="survive JSON"):
        optimizer.serialize_cache_state({"entries": {}, "meta": {1: "int key"}})
    with pytest.raises(ValueError, match="not a cache state"):
        optimizer.deserialize_cache_state('{"entries": {"0": "data"}}')
    (tmp_path / "bad.json").write_text('{"format": "kvpatch.fibkvc_cache_state", "version": 1, "state": {}, '
                                       '"entries": [[0, 1]]}')
    with pytest.raises(ValueError, match="malformed cache state entry"):
        optimizer.load_from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="extra"):
        FibonacciHashingConfig(monitor_everything=True)  # type: ignore[call-arg]


# -- the index stages ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl, params", [("fibonacci", {"initial_capacity": 4, "max_load_factor": 0.5}), ("dict", {})])
def test_index_stages_build_from_config_and_share_one_interface(impl: str, params: dict) -> None:
    config = kvpatch.load_config({"name": "t", "stages": [{"kind": "index", "impl": impl, "params": params}]})
    stage = config.stages_of("index")[0].build()
    keys = [i << 20 for i in range(50)] + [b"\x01" * 32]
    for slot, key in enumerate(keys):
        stage.put(key, slot)
    assert stage.delete(keys[10]) and not stage.delete(keys[10])
    assert [stage.get(k) for k in keys] == [None if i == 10 else i for i in range(len(keys))]
    assert len(stage) == len(keys) - 1
    stats = stage.stats()
    assert stats["size"] == len(keys) - 1 and stats["lookups"] == len(keys)
    assert stats["hit_rate"] == pytest.approx(50 / 51)


def test_index_stage_params_are_validated() -> None:
    with pytest.raises(kvpatch.ConfigError, match="initial_capacity"):
        kvpatch.load_config({"name": "t", "stages": [{"kind": "index", "impl": "fibonacci",
                                                      "params": {"initial_capacity": 100}}]})
