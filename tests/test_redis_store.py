"""The Redis tier of `store/memory` against a real `redis-server` on loopback (started here on a
free port; CI installs the Debian package). Skipped only when the binary is absent."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvpatch.errors import ConfigError
from kvpatch.reuse.chunk import ChunkAuthError, ChunkForeignError, ChunkFormatError, StoredChunk
from kvpatch.reuse.memory_store import TieredChunkStore
from kvpatch.reuse.redis_tier import RedisTier, StoreUnavailableWarning
from kvpatch.reuse.sealed import SECRET_ENV, seal

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (CI installs it)")
redis = pytest.importorskip("redis")


class RedisServer:
    """A throwaway redis-server (no persistence) on a free loopback port; restartable on it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


SECRET = "fleet-secret-0123456789"


@pytest.fixture(autouse=True)
def fleet_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process of a test shares one chunk secret (subprocesses inherit it)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def make_chunk(i: int, tokens: int = 16) -> StoredChunk:
    kv = torch.randn(2, 2, 2, tokens, 8, generator=torch.Generator().manual_seed(i))
    return StoredChunk(f"{i:064x}", f"c{i:063x}", torch.arange(tokens), 0, {"kv": kv})


def tier(srv: RedisServer, **kw: object) -> RedisTier:
    return RedisTier(srv.url, namespace="test", **kw)  # type: ignore[arg-type]


_PUTTER = """
import sys, torch
from kvpatch.reuse.chunk import StoredChunk
from kvpatch.reuse.memory_store import TieredChunkStore
from kvpatch.reuse.redis_tier import RedisTier
store = TieredChunkStore(10**8, remote=RedisTier(sys.argv[1], namespace="test"))
for i in range(4):
    kv = torch.randn(2, 2, 2, 16, 8, generator=torch.Generator().manual_seed(i))
    store.put(StoredChunk(f"{i:064x}", f"c{i:063x}", torch.arange(16), 0, {"kv": kv}))
print(store.stats()["redis"]["bytes"])
"""


def test_two_processes_share_chunks(server: RedisServer) -> None:
    out = subprocess.run([sys.executable, "-c", _PUTTER, server.url], capture_output=True, text=True, check=True)
    assert int(out.stdout) == 4 * len(seal(make_chunk(0), SECRET.encode()))
    store = TieredChunkStore(10**8, remote=tier(server))  # this process never computed them
    for i in range(4):
        assert torch.equal(store.get(f"{i:064x}").tensors["kv"], make_chunk(i).tensors["kv"])
    assert store.get_by_content(f"c{5:063x}") is None
    assert store.get_by_content(f"c{3:063x}") is not None  # already promoted into RAM by get
    stats = store.stats()
    assert stats["hits_by_tier"]["redis"] == 4 and stats["promotions"] == 4 and stats["misses"] == 1


_CONCURRENT_WRITER = """
import sys, torch
from kvpatch.reuse.chunk import StoredChunk
from kvpatch.reuse.redis_tier import RedisTier
url, worker, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
remote = RedisTier(url, namespace="test", budget_bytes=budget)
for step in range(30):
    i = (worker * 5 + step) % 12  # workers overlap on keys
    kv = torch.randn(2, 2, 2, 16, 8, generator=torch.Generator().manual_seed(i))
    remote.write(StoredChunk(f"{i:064x}", f"c{i:063x}", torch.arange(16), 0, {"kv": kv}))
    remote.read(f"{(i + 3) % 12:064x}")
assert remote.errors == 0, remote.errors
"""


def test_processes_writing_at_once_keep_the_budget_and_whole_chunks(server: RedisServer) -> None:
    """Three processes put and get concurrently in one namespace: the budget holds, the
    bookkeeping agrees with what is stored, and every stored value is one whole chunk."""
    size = len(seal(make_chunk(0), SECRET.encode()))
    budget = 5 * size + size // 2
    writers = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_WRITER, server.url, str(w), str(budget)],
                                stderr=subprocess.PIPE, text=True) for w in range(3)]
    for writer in writers:
        assert writer.wait(120) == 0, writer.stderr.read()
    remote, client = tier(server), redis.Redis(port=server.port)
    held = [i for i in range(12) if remote.contains(make_chunk(i).prefix_hash)]
    assert 0 < len(held) <= 5
    assert client.zcard("test:lru") == client.hlen("test:meta") == len(held) == len(client.keys("test:c:*"))
    assert remote.stats()["bytes"] == len(held) * size <= budget
    for i in held:
        assert torch.equal(remote.read(make_chunk(i).prefix_hash).tensors["kv"], make_chunk(i).tensors["kv"])


def test_server_down_means_misses_and_one_warning(server: RedisServer) -> None:
    remote = tier(server, retry_s=0.2)
    store = TieredChunkStore(10**8, remote=remote)
    store.put(make_chunk(0))
    server.stop()
    with pytest.warns(StoreUnavailableWarning) as caught:
        store.put(make_chunk(1))  # dropped from Redis, kept in RAM
        for i in range(2, 6):
            assert store.get(f"{i:064x}") is None
            assert not store.contains(f"{i:064x}")
    assert len(caught) == 1 and "unavailable" in str(caught[0].message)
    assert store.get(make_chunk(1).prefix_hash) is not None  # RAM still serves
    assert remote.stats()["available"] is False and remote.stats()["bytes"] is None
    server.start()  # an empty server on the same port
    time.sleep(0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.put(make_chunk(7))
        assert remote.contains(make_chunk(7).prefix_hash) and remote.stats()["available"]


def test_a_server_that_stops_answering_costs_at_most_its_timeout(server: RedisServer) -> None:
    """A hung server (SIGSTOP: connections accepted, never answered): the first call waits
    `timeout_s`, the next ones skip it for `retry_s`; once it answers again the tier is back."""
    remote = tier(server, timeout_s=0.3, retry_s=0.5)
    remote.write(make_chunk(0))
    key = make_chunk(0).prefix_hash
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.warns(StoreUnavailableWarning, match="unavailable"):
            start = time.monotonic()
            results = [remote.read(key) for _ in range(5)]
            elapsed = time.monotonic() - start
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert results == [None] * 5 and elapsed < 0.3 * 2 + 0.5  # one timeout (connect + read), then skips
    assert remote.skipped >= 4
    time.sleep(0.6)  # past retry_s
    assert remote.read(key) is not None and remote.stats()["available"]


def test_budget_evicts_least_recently_used(server: RedisServer) -> None:
    size = len(seal(make_chunk(0), SECRET.encode()))
    remote = tier(server, budget_bytes=3 * size + size // 2)
    for i in range(3):
        remote.write(make_chunk(i))
    assert remote.read(make_chunk(0).prefix_hash) is not None  # 0 becomes the most recent
    remote.write(make_chunk(3))
    remote.write(make_chunk(4))
    present = [remote.contains(make_chunk(i).prefix_hash) for i in range(5)]
    assert present == [True, False, False, True, True]
    assert remote.stats()["bytes"] == 3 * size and remote.stats()["evictions"] == 2
    client = redis.Redis(port=server.port)
    assert client.zcard("test:lru") == 3 and client.hlen("test:meta") == 3
    assert remote.read_by_content(make_chunk(1).content_hash) is None  # its content key went too
    remote.write(StoredChunk("big", "big", torch.arange(200), 0, {"kv": torch.zeros(2, 2, 2, 200, 8)}))
    assert remote.stats()["rejected"] == 1 and not remote.contains("big")


@pytest.mark.parametrize("damage", ["garbage", "wrong-type"])
def test_damaged_bookkeeping_is_repaired_not_an_outage(server: RedisServer, damage: str) -> None:
    """Someone who can write the namespace overwrites its byte count, clock and chunk list: stats
    still answer, the next put recounts and keeps the budget, and nothing is reported down."""
    size = len(seal(make_chunk(0), SECRET.encode()))
    remote = tier(server, budget_bytes=2 * size + size // 2)
    remote.write(make_chunk(0))
    remote.write(make_chunk(1))
    client = redis.Redis(port=server.port)
    if damage == "garbage":
        client.set("test:bytes", "garbage")
        client.set("test:clock", "not a time")
        client.hset("test:meta", make_chunk(1).prefix_hash, "no size here")
    else:
        client.delete("test:bytes", "test:clock")
        client.rpush("test:bytes", "a list")
        client.rpush("test:clock", "a list")
    assert "bytes" in remote.stats()  # no ValueError out of stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreUnavailableWarning)  # a repair is not an outage
        remote.write(make_chunk(2))
        remote.write(make_chunk(3))
        assert remote.read(make_chunk(3).prefix_hash) is not None
    assert remote.errors == 0 and remote.stats()["available"]
    held = [i for i in range(4) if remote.contains(make_chunk(i).prefix_hash)]
    assert 3 in held and len(held) <= 2
    assert remote.stats()["bytes"] == sum(len(client.get(f"test:c:{make_chunk(i).prefix_hash}")) for i in held)


def test_ttl_expires_unused_chunks(server: RedisServer) -> None:
    remote = tier(server, ttl_s=0.4)
    remote.write(make_chunk(0))
    remote.write(make_chunk(1))
    for _ in range(3):
        time.sleep(0.2)
        assert remote.read(make_chunk(0).prefix_hash) is not None  # a hit refreshes the TTL
    assert not remote.contains(make_chunk(1).prefix_hash)
    assert remote.read_by_content(make_chunk(0).content_hash) is not None
    time.sleep(0.5)
    assert remote.read(make_chunk(0).prefix_hash) is None
    remote.write(make_chunk(2))  # accounting forgets what expired
    assert remote.stats()["bytes"] == len(seal(make_chunk(2), SECRET.encode()))


def test_damaged_value_is_a_miss(server: RedisServer) -> None:
    remote = tier(server)
    remote.write(make_chunk(0))
    client = redis.Redis(port=server.port)
    key = f"test:c:{make_chunk(0).prefix_hash}"
    data = bytearray(client.get(key))
    data[-1] ^= 0xFF
    client.set(key, bytes(data))
    with pytest.raises(ChunkFormatError, match="checksum mismatch"):
        remote.read(make_chunk(0).prefix_hash)
    store = TieredChunkStore(10**8, remote=remote)
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert store.get(make_chunk(0).prefix_hash) is None
    assert store.stats()["corrupt"] == 1 and store.stats()["misses"] == 1


# -- shared tiers are a trust boundary: key binding and authentication ----------------------------------


def test_value_copied_under_another_key_is_a_miss(server: RedisServer) -> None:
    remote = tier(server)
    remote.write(make_chunk(0))
    remote.write(make_chunk(1))
    client = redis.Redis(port=server.port)
    client.set(f"test:c:{make_chunk(1).prefix_hash}", client.get(f"test:c:{make_chunk(0).prefix_hash}"))
    with pytest.raises(ChunkForeignError, match="copied from another key"):
        remote.read(make_chunk(1).prefix_hash)
    store = TieredChunkStore(10**8, remote=remote)
    with pytest.warns(RuntimeWarning, match="copied from another key"):
        assert store.get(make_chunk(1).prefix_hash) is None
    assert store.stats()["foreign"] == 1 and store.get(make_chunk(0).prefix_hash) is not None


def test_value_written_without_the_secret_is_a_miss(server: RedisServer) -> None:
    intruder = tier(server, authenticate=False)  # a client that can reach Redis but lacks the secret
    intruder.write(make_chunk(0))
    forger = tier(server, secret="another-secret-0123456789")
    forger.write(make_chunk(1))
    store = TieredChunkStore(10**8, remote=tier(server))
    with pytest.warns(RuntimeWarning, match="written without the chunk secret"):
        assert store.get(make_chunk(0).prefix_hash) is None
    assert store.get(make_chunk(1).prefix_hash) is None
    with pytest.raises(ChunkAuthError, match="HMAC mismatch"):
        store.remote.read(make_chunk(1).prefix_hash)
    assert store.stats()["unauthenticated"] == 2 and store.stats()["hits"] == 0


def test_oversized_or_mistyped_value_is_refused_unread(server: RedisServer) -> None:
    remote = tier(server, budget_bytes=10_000)
    client = redis.Redis(port=server.port)
    client.set(f"test:c:{'a' * 64}", b"x" * 20_000)
    client.hset(f"test:c:{'b' * 64}", "field", "value")
    with pytest.raises(ChunkFormatError, match="a value of 20000 bytes, expected a sealed chunk of at most 10000"):
        remote.read("a" * 64)
    with pytest.raises(ChunkFormatError, match="not a string value"):
        remote.read("b" * 64)
    assert remote.stats()["available"]  # a hostile value is not an outage


def test_shared_tier_without_a_secret_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(ConfigError, match=f"redis.secret: .* set redis.secret or {SECRET_ENV}"):
        RedisTier("redis://127.0.0.1:1/0")
    assert RedisTier("redis://127.0.0.1:1/0", authenticate=False).stats()["authenticated"] is False


def test_other_model_and_copied_values_never_change_outputs(server: RedisServer) -> None:
    """Through the whole reuse path: values from another model's namespace, and a value copied
    under another key, are misses (counted); outputs equal the no-reuse run."""
    import kvpatch
    from kvpatch.reuse.chunker import chunk_spans
    from kvpatch.testing import tiny_model

    config = {"name": "redis_integrity", "stages": [
        {"kind": "chunker", "impl": "fixed", "params": {"size": 8}},
        {"kind": "matcher", "impl": "exact"},
        {"kind": "store", "impl": "memory", "params": {"redis": {"url": server.url, "namespace": "e2e"}}}]}
    ids_a = torch.randint(5, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    ids_b = torch.randint(5, 300, (1, 20), generator=torch.Generator().manual_seed(2))

    def last_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, logits_to_keep=1).logits[:, -1]

    other = tiny_model("llama", seed=1)  # another model, same shapes, same Redis namespace
    other_handle = kvpatch.apply(other, config)
    last_logits(other, ids_a)
    this = tiny_model("llama")
    handle = kvpatch.apply(this, config)
    last_logits(this, ids_b)
    spans = chunk_spans(ids_a[0].tolist(), 8)
    mine = handle.reuse.hasher.prefix_hashes(ids_a[0], spans)
    theirs = other_handle.reuse.hasher.prefix_hashes(ids_a[0], spans)
    client = redis.Redis(port=server.port)
    for key, source in zip(mine, theirs):  # the other model's K/V under this model's keys
        client.set(f"e2e:c:{key}", client.get(f"e2e:c:{source}"))
    mine_b = handle.reuse.hasher.prefix_hashes(ids_b[0], spans)
    client.set(f"e2e:c:{mine[0]}", client.get(f"e2e:c:{mine_b[0]}"))  # and another key's value

    fresh = tiny_model("llama")
    fresh_handle = kvpatch.apply(fresh, config)
    with pytest.warns(RuntimeWarning):
        out = last_logits(fresh, ids_a)
    torch.testing.assert_close(out, last_logits(tiny_model("llama"), ids_a), atol=1e-5, rtol=0)
    stats = fresh_handle.reuse.store.stats()
    assert stats["foreign"] == len(mine) and stats["hits"] == 0 and fresh_handle.reuse.last.reused_tokens == 0


def test_values_sealed_under_another_secret_are_misses_end_to_end(server: RedisServer) -> None:
    """A client with the wrong secret (or none) writes this model's chunks under the right keys:
    every one is an unauthenticated miss, nothing is reused, outputs equal the no-reuse run."""
    import kvpatch
    from kvpatch.testing import tiny_model

    def config(secret: str) -> dict:
        redis_params = {"url": server.url, "namespace": "auth", "secret": secret}
        return {"name": "redis_auth", "stages": [
            {"kind": "chunker", "impl": "fixed", "params": {"size": 8}}, {"kind": "matcher", "impl": "exact"},
            {"kind": "store", "impl": "memory", "params": {"redis": redis_params}}]}

    ids = torch.randint(5, 300, (1, 20), generator=torch.Generator().manual_seed(5))
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    intruder = tiny_model("llama")  # the same model: the same keys, plausible K/V
    kvpatch.apply(intruder, config("an-intruder-secret-0123456789"))
    with torch.no_grad():
        intruder.generate(ids, **gen)  # writes its chunks through to Redis
    assert redis.Redis(port=server.port).keys("auth:c:*")
    victim = tiny_model("llama")
    handle = kvpatch.apply(victim, config(SECRET))
    with pytest.warns(RuntimeWarning), torch.no_grad():
        out = victim.generate(ids, **gen)
    with torch.no_grad():
        assert torch.equal(out, tiny_model("llama").generate(ids, **gen))
    stats = handle.reuse.store.stats()
    assert stats["unauthenticated"] >= 2 and stats["hits"] == 0


# -- end to end: the Engine with a Redis tier ----------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog. " * 7

_WARMER = """
import sys, kvpatch
from kvpatch.engine import Engine
from kvpatch.models import load_named
model, tokenizer = load_named("tiny-llama", "cpu")
engine = Engine(model, tokenizer, kvpatch.load_config(sys.argv[1]))
engine.warm(sys.argv[2])
"""


def reuse_config(srv: RedisServer) -> dict:
    import kvpatch

    config = kvpatch.load_config("prefix_reuse").model_dump()
    config["stages"][-1]["params"]["redis"] = {"url": srv.url, "namespace": "e2e", "retry_s": 60}
    return config


def test_engine_second_process_hits_and_survives_an_outage(server: RedisServer, tmp_path: Path) -> None:
    import json

    from kvpatch.engine import Engine
    from kvpatch.models import load_named

    config_path = tmp_path / "redis_reuse.json"
    config_path.write_text(json.dumps(reuse_config(server)))
    subprocess.run([sys.executable, "-c", _WARMER, str(config_path), PROMPT], check=True, capture_output=True)
    model, tokenizer = load_named("tiny-llama", "cpu")
    engine = Engine(model, tokenizer, reuse_config(server))
    first = engine.generate(PROMPT + " again", max_new_tokens=4)
    assert first.kv_reuse_ratio > 0.5  # the other process's prefill, found in Redis
    assert engine.reuse.store.stats()["hits_by_tier"]["redis"] >= 2
    server.stop()
    other = Engine(*load_named("tiny-llama", "cpu"), reuse_config(server))
    with pytest.warns(StoreUnavailableWarning):
        result = other.generate("A different prompt about something else entirely. " * 4, max_new_tokens=4)
    assert result.kv_reuse_ratio == 0 and len(result.tokens) > 0  # generate still succeeds
