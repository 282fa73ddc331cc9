"""The remote tier of a chunk store: a Redis server (or Redis Cluster) that a fleet of processes shares.

Values are sealed chunk bytes (`sealed.seal`: the chunk format, a checksum and an HMAC under the
chunk secret), so a damaged value, one copied from another key or one written by a client without
the secret is refused (a ChunkFormatError subclass: the store counts it as a miss), never used as
K/V. Reads are bounded: a value longer than the budget (or MAX_CHUNK_BYTES) is refused by the
server-side script before it is sent. Keys, under a namespace `ns`:

    {ns}:c:{prefix_hash}   the chunk            {ns}:lru    sorted set: prefix hash -> last use (us)
    {ns}:h:{content_hash}  -> its prefix hash   {ns}:meta   hash: prefix hash -> "size content_hash"
                                                {ns}:bytes  bytes of every chunk in {ns}:lru
                                                {ns}:clock  the last recency score given

A put and a hit are one Lua script each (one round trip, atomic across processes): a put
stores the chunk, accounts its bytes, then evicts the least recently used chunks of the
namespace until it fits `budget_bytes`; a hit refreshes recency and the TTL (`ttl_s` is the time
since a chunk's last put or hit). Chunks that expired are dropped from the accounting at the
next put.

Redis Cluster (`cluster=True`, `url` naming any node): a script may only touch keys of one hash
slot, so the namespace is split into `shards` sub-namespaces `{ns:0}` .. `{ns:<shards-1>}` (the
braces are a hash tag: each shard's keys, bookkeeping included, share one slot, and the shards'
slots spread over the nodes). A chunk lives in shard CRC-32(prefix hash) mod `shards`, with its
content key; the scripts above run unchanged inside one shard, so put and hit stay atomic, but
LRU and `budget_bytes` are per shard: each shard holds at most budget_bytes / shards (the total
stays within the budget; a chunk larger than one shard's share is rejected). A content lookup
does not know its shard and asks each in turn (exact prefix lookups cost one call). The nodes
must run with `cluster-require-full-coverage no`, else a lost node stops the whole cluster.

A server that is down or slow never raises out of here: the call is a miss (or a dropped put),
one `StoreUnavailableWarning` is issued per outage, and calls are skipped for `retry_s` seconds
so lookups do not each wait for a timeout. On a cluster this holds per node: a lost node's shards
are misses (one warning), the other nodes keep serving theirs.

Authentication is on by default (`authenticate=True`): a Redis namespace is writable by every
client that can reach the server, so a checksum alone would let any of them plant K/V that steer
other tenants' outputs. The secret comes from `secret` or `$KVPATCH_CHUNK_SECRET`; with neither,
construction raises ConfigError. Not a per-process random secret: this tier exists to share chunks
between processes, and a secret no other process knows would make every process refuse every
other's values, a silently useless (and costly) tier. `authenticate=False` is the config author's
explicit statement that only trusted processes can write to this Redis.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError, KVPatchError
from ..stage_specs.store_memory import cluster_problem
from .chunk import MAX_CHUNK_BYTES, ChunkFormatError, StoredChunk, StoreUnavailableWarning
from .sealed import SECRET_ENV, resolve_secret, seal, unseal

T = TypeVar("T")
log = logging.getLogger(__name__)

__all__ = ["RedisTier", "StoreUnavailableWarning"]


#: Recency scores: server time in microseconds, made strictly increasing per namespace (so two
#: uses within one microsecond, from any processes, still have an order). Formatted with %d: Lua
#: would print a number this large in exponent notation.
_CLOCK = """
local function number_at(key)
  -- the number a bookkeeping key holds; nil (and the key dropped) if anything else is there
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then redis.call('DEL', key); return nil end
  local n = tonumber(value)
  if value and not n then redis.call('DEL', key) end
  return n
end
local function clock()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = number_at(ARGV[1] .. ':clock') or 0
  if now <= last then now = last + 1 end
  redis.call('SET', ARGV[1] .. ':clock', string.format('%d', now))
  return now
end
"""

_FORGET = _CLOCK + """
local function forget(m)
  local info = redis.call('HGET', KEYS[2], m)
  redis.call('ZREM', KEYS[1], m)
  if not info then return end
  local size, content = string.match(info, '^(%d+) (.*)$')
  redis.call('HDEL', KEYS[2], m)
  redis.call('DEL', ARGV[1] .. ':c:' .. m)
  if not size then return end  -- a damaged entry: its value is gone, its bytes are recounted
  redis.call('DECRBY', KEYS[3], size)
  if redis.call('GET', ARGV[1] .. ':h:' .. content) == m then redis.call('DEL', ARGV[1] .. ':h:' .. content) end
end
"""

#: KEYS: lru, meta, bytes. ARGV: ns, prefix hash, content hash, data, ttl ms (0: none), budget (0: none).
#: Returns the number of chunks evicted, or -1 if the chunk alone exceeds the budget.
_PUT = _FORGET + """
local p, c, data = ARGV[2], ARGV[3], ARGV[4]
local ttl, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local size = string.len(data)
if budget > 0 and size > budget then return -1 end
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then redis.call('DEL', KEYS[1]) end
if redis.call('TYPE', KEYS[2]).ok ~= 'hash' then redis.call('DEL', KEYS[2]) end
if number_at(KEYS[3]) == nil then
  -- the byte count was damaged (or never set): recount it from the chunk list
  local total, entries = 0, redis.call('HGETALL', KEYS[2])
  for i = 1, #entries, 2 do
    local size = tonumber(string.match(entries[i + 1], '^(%d+) '))
    if size then total = total + size else forget(entries[i]) end  -- an entry without a size goes
  end
  redis.call('SET', KEYS[3], string.format('%d', total))
end
local now = clock()
if ttl > 0 then
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - ttl * 1000))) do
    forget(m)
  end
end
forget(p)
for _, kv in ipairs({{ARGV[1] .. ':c:' .. p, data}, {ARGV[1] .. ':h:' .. c, p}}) do
  if ttl > 0 then redis.call('SET', kv[1], kv[2], 'PX', ttl) else redis.call('SET', kv[1], kv[2]) end
end
redis.call('HSET', KEYS[2], p, size .. ' ' .. c)
redis.call('ZADD', KEYS[1], string.format('%d', now), p)
local used = redis.call('INCRBY', KEYS[3], size)
local evicted = 0
while budget > 0 and used > budget do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if oldest == nil or oldest == p then break end
  forget(oldest)
  evicted = evicted + 1
  used = tonumber(redis.call('GET', KEYS[3]))
end
return evicted
"""

#: KEYS: lru, meta. ARGV: ns, "prefix" | "content", hash, ttl ms, max bytes. Returns nil, or
#: {prefix hash, chunk bytes}, or {prefix hash, size} for a value over max bytes (not sent; -1:
#: not a string value).
_GET = _CLOCK + """
local ns, ttl, p = ARGV[1], tonumber(ARGV[4]), ARGV[3]
if ARGV[2] == 'content' then
  p = redis.call('GET', ns .. ':h:' .. ARGV[3])
  if not p then return false end
end
local kind = redis.call('TYPE', ns .. ':c:' .. p).ok
if kind == 'none' then return false end
if kind ~= 'string' then return {p, -1} end
local size = redis.call('STRLEN', ns .. ':c:' .. p)
if size > tonumber(ARGV[5]) then return {p, size} end
local data = redis.call('GET', ns .. ':c:' .. p)
redis.call('ZADD', KEYS[1], 'XX', string.format('%d', clock()), p)
if ttl > 0 then
  redis.call('PEXPIRE', ns .. ':c:' .. p, ttl)
  local info = redis.call('HGET', KEYS[2], p)
  if info then redis.call('PEXPIRE', ns .. ':h:' .. string.match(info, '^%d+ (.*)$'), ttl) end
end
return {p, data}
"""


_SCRIPTS = {"put": _PUT, "get": _GET}
_SHA1 = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in _SCRIPTS.items()}

#: Shards of a namespace on a Redis Cluster when the config does not say.
DEFAULT_SHARDS = 16


class RedisTier:
    """Chunks in a Redis server or a Redis Cluster (`cluster`), shared by every process that uses
    the same `url` and `namespace`."""

    name = "redis"

    def __init__(self, url: str, namespace: str = "kvpatch", budget_bytes: int | None = None,
                 ttl_s: float | None = None, timeout_s: float = 0.5, retry_s: float = 5.0,
                 secret: str | bytes | None = None, authenticate: bool = True, cluster: bool = False,
                 shards: int | None = None) -> None:
        self.secret = resolve_secret(secret, "redis.secret") if authenticate else None
        if authenticate and self.secret is None:
            raise ConfigError(
                f"redis.secret: the Redis chunk tier {url} is shared by every client that can reach it, so its "
                f"values must be authenticated: set redis.secret or {SECRET_ENV} (the same in every process that "
                "shares the namespace), or redis.authenticate: false if only trusted processes can write to it")
        try:
            import redis
        except ImportError:
            raise KVPatchError("the redis chunk-store tier needs redis-py: pip install 'kvpatch[redis]'") from None
        problem = cluster_problem(url, cluster, shards)
        if problem is not None:
            raise ConfigError(f"redis.{problem}")
        self.url, self.namespace, self.cluster = url, namespace, cluster
        self.shards = (shards or DEFAULT_SHARDS) if cluster else 1
        self.budget_bytes, self.ttl_ms = budget_bytes or 0, int((ttl_s or 0) * 1000)
        self.shard_budget = self.budget_bytes // self.shards  # 0: no budget
        if self.budget_bytes and not self.shard_budget:
            raise ConfigError(f"redis.budget_bytes: {self.budget_bytes} bytes cannot be split over "
                              f"{self.shards} shards; expected at least one byte per shard")
        self.retry_s, self._timeout_s = retry_s, timeout_s
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        if cluster:  # slot-map failures (a slot no node serves) are not RedisErrors
            self._errors += (redis.exceptions.RedisClusterException,)
        self._wrong_type = redis.ResponseError
        self._namespaces = [self._shard_namespace(i) for i in range(self.shards)] if cluster else [namespace]
        self._client: Any = None
        self._no_script = redis.exceptions.NoScriptError
        if not cluster:  # a cluster client is made at the first call (see _connected)
            self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._down: dict[str, float] = {}  # server (cluster: node) considered down -> when to try again
        self.evictions = self.errors = self.skipped = self.rejected = 0
        self.max_value_bytes = min(self.shard_budget or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES)

    def contains(self, prefix_hash: str) -> bool:
        ns = self.shard_of(prefix_hash)
        return bool(self._call("exists", lambda: self._connected().exists(f"{ns}:c:{prefix_hash}"), 0, ns))

    def read(self, prefix_hash: str) -> StoredChunk | None:
        return self._fetch("prefix", prefix_hash)

    def read_by_content(self, content_hash: str) -> StoredChunk | None:
        return self._fetch("content", content_hash)

    def discard(self, prefix_hash: str) -> None:
        """Nothing to do: the recomputed chunk's put replaces the refused value."""

    def write(self, chunk: StoredChunk) -> None:
        data = seal(chunk, self.secret)
        ns = self.shard_of(chunk.prefix_hash)
        args = [ns, chunk.prefix_hash, chunk.content_hash, data, self.ttl_ms, self.shard_budget]
        evicted = self._call("put", lambda: self._eval("put", ns, 3, args), 0, ns)
        if evicted < 0:
            self.rejected += 1
        else:
            self.evictions += evicted

    def bytes_used(self) -> int | None:
        """Bytes the namespace holds on the server (every process's chunks; on a cluster the sum
        over its shards), None if unreachable (any shard's node) or unknown."""
        counts = [self._call("stats", lambda ns=ns: self._read_count(ns), None, ns) for ns in self._namespaces]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]

    def _read_count(self, ns: str) -> int | None:
        """The byte count of (shard) namespace `ns`; None if the key holds something else (the
        next put recounts it): damaged bookkeeping is not an outage."""
        try:
            raw = self._connected().get(f"{ns}:bytes")
        except self._wrong_type:  # WRONGTYPE: another kind of value under the key
            return None
        try:
            return int(raw) if raw is not None else 0
        except ValueError:  # garbage under the key
            return None

    def stats(self) -> dict[str, Any]:
        stats = {"bytes": self.bytes_used(), "evictions": self.evictions, "available": not self._down,
                 "errors": self.errors, "skipped_while_down": self.skipped, "rejected": self.rejected,
                 "authenticated": self.secret is not None, "budget_bytes": self.budget_bytes or None,
                 "ttl_s": self.ttl_ms / 1000 or None}
        if self.cluster:
            stats.update(shards=self.shards, unavailable=sorted(self._down))
        return stats

    # -- where keys live ----------------------------------------------------------------------

    def _shard_namespace(self, index: int) -> str:
        """A shard's namespace: a hash tag, so that every key of the shard is in one slot."""
        return "{" + f"{self.namespace}:{index}" + "}"

    def shard_of(self, key: str) -> str:
        """The namespace that holds chunk `key` (a prefix hash): the namespace itself on one
        server; on a cluster one of the shards', by CRC-32 of the key (the same in every process)."""
        return self._namespaces[zlib.crc32(key.encode()) % self.shards] if self.cluster else self.namespace

    def _endpoint(self, ns: str) -> str:
        """What an outage is tracked by: the server; on a cluster the node that serves `ns`'s
        slot (the cluster as a whole while the slot map is unknown)."""
        if not self.cluster or self._client is None:
            return self.url
        try:
            return str(self._client.get_node_from_key(f"{ns}:lru").name)
        except self._errors:
            return self.url

    # -- calls --------------------------------------------------------------------------------


    def _connected(self) -> Any:
        """The client. A cluster client is made at the first call, not at construction: it must
        reach a node to learn the slot map, and a cluster that is down is an outage (misses), not
        a config error. redis-py's own retries are off: a failed call is a miss at once."""
        if self._client is None:
            from redis.backoff import NoBackoff
            from redis.cluster import RedisCluster
            from redis.retry import Retry

            self._client = RedisCluster.from_url(self.url, socket_timeout=self._timeout_s,
                                                 socket_connect_timeout=self._timeout_s, retry=Retry(NoBackoff(), 0))
        return self._client

    def _eval(self, script: str, ns: str, n_keys: int, args: list[Any]) -> Any:
        """Run `script` ("put" or "get") in (shard) namespace `ns`; its first `n_keys` of
        lru, meta, bytes are passed as KEYS (they route the call to the shard's slot)."""
        client = self._connected()
        keys = [f"{ns}:lru", f"{ns}:meta", f"{ns}:bytes"][:n_keys]
        try:
            return client.evalsha(_SHA1[script], n_keys, *keys, *args)
        except self._no_script:  # not in this node's script cache yet (new, restarted, flushed): send it
            return client.eval(_SCRIPTS[script], n_keys, *keys, *args)  # to that node only (not SCRIPT LOAD,
            # which a cluster client sends to every node: one node down would fail every shard's call)

    def _fetch(self, mode: str, key: str) -> StoredChunk | None:
        """The chunk, None on a miss (or while down); a refused value raises a ChunkFormatError
        subclass (the store counts it as a miss). A content hash does not say which shard holds
        its chunk, so on a cluster a content lookup asks every shard until one has it."""
        for ns in self._namespaces if mode == "content" else [self.shard_of(key)]:
            chunk = self._fetch_in(ns, mode, key)
            if chunk is not None:
                return chunk
        return None

    def _fetch_in(self, ns: str, mode: str, key: str) -> StoredChunk | None:
        args = [ns, mode, key, self.ttl_ms, self.max_value_bytes]
        reply = self._call("get", lambda: self._eval("get", ns, 2, args), None, ns)
        if reply is None:
            return None
        stored_under, data = reply
        prefix_hash = stored_under.decode(errors="replace") if isinstance(stored_under, bytes) else str(stored_under)
        where = f"redis {self.url} {ns}:c:{prefix_hash[:16]}"
        if not isinstance(data, bytes):
            found = "not a string value" if data < 0 else f"a value of {data} bytes"
            raise ChunkFormatError(f"{where}: {found}, expected a sealed chunk of at most {self.max_value_bytes} bytes")
        return unseal(data, where, key=prefix_hash, secret=self.secret)

    def _call(self, what: str, op: Callable[[], T], default: T, ns: str | None = None) -> T:
        """`op()`, or `default` if the server (on a cluster: the node of `ns`'s slot) fails; then
        calls to it are skipped for `retry_s` seconds. One warning per outage of each."""
        endpoint = self._endpoint(ns) if ns is not None else self.url
        retry_at = self._down.get(endpoint)
        if retry_at is not None and time.monotonic() < retry_at:
            self.skipped += 1
            return default
        try:
            result = op()
        except self._errors as err:
            self.errors += 1
            if retry_at is None:
                server = f"{self.url} (cluster node {endpoint})" if endpoint != self.url else self.url
                warnings.warn(f"redis chunk store {server} unavailable ({what}: {err}); its lookups are misses "
                              f"until it is back (retrying every {self.retry_s:g} s)", StoreUnavailableWarning,
                              stacklevel=4)
            self._down[endpoint] = time.monotonic() + self.retry_s
            return default
        if retry_at is not None:
            log.warning("redis chunk store %s is back", endpoint)
            del self._down[endpoint]
        return result
