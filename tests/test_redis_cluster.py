"""The Redis tier on a real Redis Cluster: three redis-server processes in cluster mode on
loopback ports, started here (`kvpatch.testing_redis.LocalCluster`; CI installs the Debian
package). Skipped only when the binaries are absent, as tests/test_redis_store.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Iterator

import pytest
import torch

from kvpatch.errors import ConfigError
from kvpatch.reuse.chunk import ChunkAuthError, StoredChunk
from kvpatch.reuse.memory_store import TieredChunkStore
from kvpatch.reuse.redis_tier import RedisTier, StoreUnavailableWarning
from kvpatch.reuse.sealed import SECRET_ENV, seal
from kvpatch.testing_redis import LocalCluster

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                                reason="redis-server / redis-cli are not installed (CI installs them)")
redis = pytest.importorskip("redis")

from test_redis_store import SECRET, make_chunk  # noqa: E402  (after the skip: it imports redis too)

CHUNKS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    nodes = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(autouse=True)
def empty_cluster(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts on empty nodes without cached scripts (so the first call of each script
    on a node loads it there, as on a new or restarted node), with one chunk secret for all of
    its processes."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    for port in cluster.ports:
        redis.Redis(port=port).flushall()
        redis.Redis(port=port).script_flush()


def tier(cluster: LocalCluster, **kw: object) -> RedisTier:
    return RedisTier(cluster.url, namespace="test", cluster=True, **kw)  # type: ignore[arg-type]


def node_of(cluster: LocalCluster, key: str) -> int:
    """The port of the node that holds `key` (asked of the cluster, not computed by the tier)."""
    client = redis.Redis(port=cluster.ports[0])
    slot = client.cluster("keyslot", key)
    for start, end, (_, port, *_rest), *_replicas in client.cluster("slots"):
        if start <= slot <= end:
            return int(port)
    raise AssertionError(f"no node serves slot {slot}")


def chunk_keys_by_node(cluster: LocalCluster) -> dict[int, list[bytes]]:
    return {port: redis.Redis(port=port).keys("{test:*}:c:*") for port in cluster.ports}


def test_chunks_hit_across_slots_and_spread_over_every_node(cluster: LocalCluster) -> None:
    remote = tier(cluster)
    for i in range(CHUNKS):
        remote.write(make_chunk(i))
    for i in range(CHUNKS):
        assert torch.equal(remote.read(make_chunk(i).prefix_hash).tensors["kv"], make_chunk(i).tensors["kv"])
        assert remote.read_by_content(make_chunk(i).content_hash).prefix_hash == make_chunk(i).prefix_hash
        assert remote.contains(make_chunk(i).prefix_hash)
    assert remote.read(make_chunk(CHUNKS).prefix_hash) is None
    assert remote.read_by_content(make_chunk(CHUNKS).content_hash) is None
    by_node = chunk_keys_by_node(cluster)
    assert all(by_node.values()), {port: len(keys) for port, keys in by_node.items()}  # every node holds chunks
    documented = {f"{{test:{zlib.crc32(c.prefix_hash.encode()) % 16}}}:c:{c.prefix_hash}".encode()
                  for c in map(make_chunk, range(CHUNKS))}  # the layout docs/serving.md#redis-keys gives
    assert {key for keys in by_node.values() for key in keys} == documented
    for port, keys in by_node.items():
        for key in keys:  # each chunk is where the cluster's slot map puts it, with its shard's bookkeeping
            assert node_of(cluster, key.decode()) == port
            shard = key.decode().split(":c:")[0]
            assert redis.Redis(port=port).zscore(f"{shard}:lru", key.decode().split(":c:")[1]) is not None
    size = len(seal(make_chunk(0), SECRET.encode()))
    stats = remote.stats()
    assert stats["bytes"] == CHUNKS * size and stats["shards"] == 16 and stats["available"] and remote.errors == 0


def test_budget_is_enforced_per_shard_with_lru(cluster: LocalCluster) -> None:
    size = len(seal(make_chunk(0), SECRET.encode()))
    remote = tier(cluster, shards=2, budget_bytes=2 * (2 * size + size // 2))  # two chunks per shard
    shard_of = {i: remote.shard_of(make_chunk(i).prefix_hash) for i in range(40)}
    first, second = sorted(set(shard_of.values()))
    mine = [i for i in range(40) if shard_of[i] == first][:3]
    other = [i for i in range(40) if shard_of[i] == second][:2]
    remote.write(make_chunk(mine[0]))
    remote.write(make_chunk(mine[1]))
    for i in other:
        remote.write(make_chunk(i))
    assert remote.read(make_chunk(mine[0]).prefix_hash) is not None  # now the most recent of its shard
    remote.write(make_chunk(mine[2]))  # evicts mine[1], the least recently used of the same shard only
    present = {i: remote.contains(make_chunk(i).prefix_hash) for i in mine + other}
    assert present == {mine[0]: True, mine[1]: False, mine[2]: True, other[0]: True, other[1]: True}
    assert remote.stats()["evictions"] == 1 and remote.stats()["bytes"] == 4 * size
    assert remote.read_by_content(make_chunk(mine[1]).content_hash) is None
    remote.write(StoredChunk("big", "big", torch.arange(60), 0, {"kv": torch.zeros(2, 2, 2, 60, 8)}))
    assert remote.stats()["rejected"] == 1  # over one shard's share, though under the whole budget


def test_a_lost_node_is_misses_for_its_slots_and_one_warning(cluster: LocalCluster) -> None:
    remote = tier(cluster, retry_s=0.3)
    store = TieredChunkStore(10**8, remote=remote)
    for i in range(CHUNKS):
        remote.write(make_chunk(i))
    lost = cluster.ports[1]
    on_lost = {i for i in range(CHUNKS) if node_of(cluster, remote.shard_of(make_chunk(i).prefix_hash)) == lost}
    assert 0 < len(on_lost) < CHUNKS
    cluster.kill_node(lost)
    try:
        with pytest.warns(StoreUnavailableWarning) as caught:
            for i in range(CHUNKS):
                got = store.get(make_chunk(i).prefix_hash)
                assert (got is None) == (i in on_lost), i  # the other nodes keep serving
            store.put(make_chunk(CHUNKS))  # dropped if its shard is on the lost node; no error either way
        assert len(caught) == 1 and f"cluster node 127.0.0.1:{lost}" in str(caught[0].message)
        stats = remote.stats()
        assert stats["available"] is False and stats["unavailable"] == [f"127.0.0.1:{lost}"]
        assert stats["bytes"] is None and remote.skipped >= len(on_lost) - 1
    finally:
        cluster.start_node(lost)  # rejoins empty (no persistence)
    time.sleep(0.35)  # past retry_s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in sorted(on_lost):
            remote.write(make_chunk(i))
            assert remote.read(make_chunk(i).prefix_hash) is not None
    assert remote.stats()["available"]


_PUTTER = """
import sys, torch
from kvpatch.reuse.chunk import StoredChunk
from kvpatch.reuse.memory_store import TieredChunkStore
from kvpatch.reuse.redis_tier import RedisTier
store = TieredChunkStore(10**8, remote=RedisTier(sys.argv[1], namespace="test", cluster=True))
for i in range(int(sys.argv[2])):
    kv = torch.randn(2, 2, 2, 16, 8, generator=torch.Generator().manual_seed(i))
    store.put(StoredChunk(f"{i:064x}", f"c{i:063x}", torch.arange(16), 0, {"kv": kv}))
print(store.stats()["redis"]["bytes"])
"""


def test_two_processes_share_chunks(cluster: LocalCluster) -> None:
    out = subprocess.run([sys.executable, "-c", _PUTTER, cluster.url, str(CHUNKS)], capture_output=True,
                         text=True, check=True, timeout=120)
    assert int(out.stdout) == CHUNKS * len(seal(make_chunk(0), SECRET.encode()))
    store = TieredChunkStore(10**8, remote=tier(cluster))  # this process never computed them
    for i in range(CHUNKS):
        assert torch.equal(store.get(make_chunk(i).prefix_hash).tensors["kv"], make_chunk(i).tensors["kv"])
    assert store.stats()["hits_by_tier"]["redis"] == CHUNKS


def test_values_without_the_secret_are_misses(cluster: LocalCluster) -> None:
    tier(cluster, authenticate=False).write(make_chunk(0))  # reaches the cluster, lacks the secret
    tier(cluster, secret="another-secret-0123456789").write(make_chunk(1))
    store = TieredChunkStore(10**8, remote=tier(cluster))
    with pytest.warns(RuntimeWarning, match="written without the chunk secret"):
        assert store.get(make_chunk(0).prefix_hash) is None
    assert store.get(make_chunk(1).prefix_hash) is None
    with pytest.raises(ChunkAuthError, match="HMAC mismatch"):
        store.remote.read(make_chunk(1).prefix_hash)
    assert store.stats()["unauthenticated"] == 2 and store.stats()["hits"] == 0


def test_engine_reuses_chunks_another_engine_put_in_the_cluster(cluster: LocalCluster) -> None:
    import kvpatch
    from kvpatch.engine import Engine
    from kvpatch.models import load_named

    config = kvpatch.load_config("prefix_reuse").model_dump()
    config["stages"][-1]["params"]["redis"] = {"url": cluster.url, "namespace": "test", "cluster": True,
                                               "shards": 8}
    prompt = "The quick brown fox jumps over the lazy dog. " * 7
    Engine(*load_named("tiny-llama", "cpu"), config).warm(prompt)
    assert sum(len(keys) for keys in chunk_keys_by_node(cluster).values()) >= 2
    engine = Engine(*load_named("tiny-llama", "cpu"), config)  # its own, empty RAM tier
    result = engine.generate(prompt + " again", max_new_tokens=4)
    assert result.kv_reuse_ratio > 0.5 and engine.reuse.store.stats()["hits_by_tier"]["redis"] >= 2


@pytest.mark.parametrize(("params", "problem"), [
    ({"shards": 4}, "shards: 4 given, but shards only apply with cluster: true"),
    ({"cluster": True, "url": "unix:///tmp/redis.sock"}, "cluster: true needs a redis:// or rediss:// url"),
    ({"cluster": True, "url": "redis://127.0.0.1:7000/2"}, "cluster: true: a Redis Cluster has only database 0"),
])
def test_cluster_params_that_do_not_fit_are_config_errors(params: dict, problem: str) -> None:
    import kvpatch

    config = kvpatch.load_config("prefix_reuse").model_dump()
    config["stages"][-1]["params"]["redis"] = params
    with pytest.raises(ConfigError, match=f"params.redis: .*{problem}"):
        kvpatch.load_config(config)
    with pytest.raises(ConfigError, match=f"redis.{problem}"):
        RedisTier(params.get("url", "redis://127.0.0.1:1/0"), cluster=params.get("cluster", False),
                  shards=params.get("shards"))


def test_a_budget_smaller_than_the_shard_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="redis.budget_bytes: 3 bytes cannot be split over 16 shards"):
        RedisTier("redis://127.0.0.1:1", cluster=True, budget_bytes=3)
