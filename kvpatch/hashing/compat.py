"""The fibkvc API (`FibonacciCacheOptimizer`, `FibonacciHashingConfig`) on top of `HashIndex`.

For users who know fibkvc's names. Two deliberate differences from fibkvc:

* fibkvc keys its table by token position. A position says nothing about the tokens there: the
  same text at another offset never matches, and different text at the same offset looks like a
  hit. Here `get_hash_index` takes any content key (a chunk digest as int or bytes; str is
  UTF-8 encoded); ints behave as positions did, so position-keyed code still runs.
* fibkvc hashes with floats, floor(frac(key * 0.618...) * size), which drops key bits beyond the
  53-bit mantissa. Here the hash is Knuth's exact 64-bit integer form (`fibonacci_hash`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import BaseModel, ConfigDict

from .fibonacci import table_bits
from ..files.atomic import write_text_atomic
from .index import HashIndex, IndexConfig, IndexKey

logger = logging.getLogger(__name__)
FORMAT = "kvpatch.fibkvc_cache_state"
VERSION = 1
EntryKey = Union[int, str]


class FibonacciHashingConfig(BaseModel):
    """fibkvc's monitoring switches and event callbacks (unknown options are errors)."""

    model_config = ConfigDict(extra="forbid")

    monitor_cache_hit_rate: bool = True
    monitor_lookup_latency: bool = True
    log_collisions: bool = False
    log_resizes: bool = False
    log_statistics: bool = False
    #: Gets {"token_position", "hash_index", "chain_length", "table_size"} per collision
    #: (a str key is reported as its UTF-8 bytes, the form the table stores).
    on_collision_callback: Optional[Callable[[dict[str, Any]], None]] = None
    #: Gets {"old_size", "new_size", "resize_time_ms"} per doubling; the time is that of the
    #: insert that triggered it, which the rehash dominates.
    on_resize_callback: Optional[Callable[[dict[str, Any]], None]] = None


def _index_key(key: Union[IndexKey, str]) -> IndexKey:
    return key.encode() if isinstance(key, str) else key


class FibonacciCacheOptimizer:
    """fibkvc's optimizer: a Fibonacci-hashed (or, with use_fibonacci=False, modulo-hashed)
    linear-probing table that doubles past load 0.75, plus JSON snapshots of a cache state."""

    def __init__(
        self,
        use_fibonacci: bool = True,
        initial_table_size: int = 256,
        config: Optional[FibonacciHashingConfig] = None,
    ) -> None:
        try:
            table_bits(initial_table_size)
        except ValueError:
            raise ValueError(
                f"initial_table_size must be a power-of-two int >= 1, got {initial_table_size!r}") from None
        self.use_fibonacci = use_fibonacci
        self.config = config or FibonacciHashingConfig()
        index_config = IndexConfig(initial_capacity=initial_table_size, hash="fibonacci" if use_fibonacci else "modulo",
                                   timing=self.config.monitor_lookup_latency)
        self.index = HashIndex(index_config, on_collision=self._collided, on_resize=self._resized)
        self._insert_started = 0.0

    def get_hash_index(self, token_position: Union[int, str, bytes]) -> int:
        """Table slot of the key, registering it first if new (a hit if it was known). Slots
        move when the table doubles, as in fibkvc; they are not stable store slots."""
        key = _index_key(token_position)
        if self.index.get(key) is None:
            self._register(key)
        located = self.index.locate(key)
        assert located is not None
        return located[0]

    def _register(self, key: IndexKey) -> None:
        self._insert_started = time.perf_counter()
        self.index.put(key, len(self.index))

    def _collided(self, key: IndexKey, slot: int) -> None:
        located = self.index.locate(key)
        assert located is not None
        event = {"token_position": key, "hash_index": slot, "chain_length": located[1],
                 "table_size": self.index.capacity}
        if self.config.log_collisions:
            logger.info("fibkvc collision: %s", event)
        if self.config.on_collision_callback is not None:
            self.config.on_collision_callback(event)

    def _resized(self, old_capacity: int, new_capacity: int) -> None:
        event = {"old_size": old_capacity, "new_size": new_capacity,
                 "resize_time_ms": (time.perf_counter() - self._insert_started) * 1e3}
        if self.config.log_resizes:
            logger.info("fibkvc resize: %s", event)
        if self.config.on_resize_callback is not None:
            self.config.on_resize_callback(event)

    def get_statistics(self) -> dict[str, Any]:
        """fibkvc's metrics: hit rate in percent (None when not monitored), latency in ms; the
        monitored values appear both at the top level and under "monitoring_stats"."""
        stats = self.index.stats()
        hit_rate = 100.0 * (stats["hit_rate"] or 0.0) if self.config.monitor_cache_hit_rate else None
        latency = (stats["mean_lookup_ns"] or 0.0) / 1e6 if self.config.monitor_lookup_latency else None
        monitoring = {"cache_hit_rate": hit_rate, "avg_lookup_time_ms": latency, "total_lookups": stats["lookups"],
                      "max_chain_length": stats["max_probe_length"]}
        result = {"use_fibonacci": self.use_fibonacci, "table_size": stats["capacity"], "num_entries": stats["size"],
                  "collision_count": stats["collisions"], "load_factor": stats["load_factor"],
                  "resize_count": stats["resizes"], "cache_hit_rate": hit_rate, "avg_lookup_time_ms": latency,
                  "monitoring_stats": monitoring}
        if self.config.log_statistics:
            logger.info("fibkvc statistics: %s", result)
        return result

    def serialize_cache_state(self, cache_state: Mapping[str, Any]) -> str:
        """JSON of `cache_state`; each key of its "entries" mapping (int or str) is registered in
        the table and written with its slot. Refuses what JSON would silently change (int keys
        outside "entries", tuples), so that deserialising gives back an equal state."""
        if not isinstance(cache_state, Mapping):
            raise TypeError(f"cache_state must be a mapping, got {type(cache_state).__name__}")
        entries = cache_state.get("entries")
        if entries is not None and not isinstance(entries, Mapping):
            raise TypeError(f"cache_state['entries'] must be a mapping, got {type(entries).__name__}")
        state = {key: value for key, value in cache_state.items() if key != "entries"}
        values = None if entries is None else list(entries.values())
        if json.loads(json.dumps([state, values])) != [state, values]:
            raise ValueError("cache_state does not survive JSON unchanged (non-str keys outside 'entries', "
                             "tuples, or other values JSON cannot represent exactly)")
        rows = None
        if entries is not None:
            for key in entries:
                if type(key) is not int and type(key) is not str:
                    raise TypeError(f"entry keys must be int or str, got {type(key).__name__}: {key!r}")
            rows = [[key, self.get_hash_index(key), value] for key, value in entries.items()]
        return json.dumps({"format": FORMAT, "version": VERSION, "use_fibonacci": self.use_fibonacci,
                           "table_size": self.index.capacity, "state": state, "entries": rows})

    def deserialize_cache_state(self, json_str: str) -> dict[str, Any]:
        """The cache state `serialize_cache_state` wrote, with its original (int or str) entry
        keys, which are registered in this table; ValueError if the text is not such a state."""
        state = _decode(json_str)
        for key in state.get("entries") or {}:
            if _index_key(key) not in self.index:
                self._register(_index_key(key))
        return state

    def save_to_file(self, cache_state: Mapping[str, Any], filepath: Union[str, os.PathLike[str]]) -> None:
        """Write the serialised state atomically (temp file, fsync, rename)."""
        write_text_atomic(filepath, self.serialize_cache_state(cache_state))

    def load_from_file(self, filepath: Union[str, os.PathLike[str]]) -> dict[str, Any]:
        try:
            text = Path(filepath).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"cache state file {filepath} is not UTF-8 text") from None
        return self.deserialize_cache_state(text)


def _decode(text: str) -> dict[str, Any]:
    """Parse and check a serialised cache state (no side effects)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"cache state is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(
            f"not a cache state written by FibonacciCacheOptimizer (expected format {FORMAT!r} v{VERSION})")
    state, rows = doc.get("state"), doc.get("entries")
    if not isinstance(state, dict) or not (rows is None or isinstance(rows, list)):
        raise ValueError("malformed cache state: 'state' must be an object and 'entries' a list or null")
    if rows is None:
        return state
    entries: dict[EntryKey, Any] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and type(row[0]) in (int, str)):
            raise ValueError(f"malformed cache state entry: {row!r}")
        entries[row[0]] = row[2]
    return {**state, "entries": entries}
