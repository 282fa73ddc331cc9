"""An open-addressing hash index from chunk keys to integer store slots.

Linear probing over a power-of-two table, doubled before the load factor would pass
`max_load_factor`; deletion by backward shift, so there are no tombstones and a probe run never
grows from deletes. Keys are ints (64-bit chunk keys; hashed modulo 2^64) or bytes digests.
Saved as plain JSON (never pickle) with a checksum, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..files.atomic import write_text_atomic
from ..params import PowerOfTwo, power_of_two
from .fibonacci import HashMethod, key_to_u64, slot_function

IndexKey = Union[int, bytes]
FORMAT = "kvpatch.hash_index"
VERSION = 1


class IndexConfig(BaseModel):
    """How a `HashIndex` sizes, grows and hashes; part of every saved file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_capacity: PowerOfTwo = 16
    max_load_factor: float = Field(default=0.75, gt=0.0, lt=1.0)
    hash: HashMethod = "fibonacci"
    #: Time every `get` with perf_counter_ns (costs ~100 ns a lookup, so off by default).
    timing: bool = False


def _code(key: IndexKey) -> int:
    """The 64-bit code a key is hashed from; refuses what the index cannot store or save."""
    if type(key) is int:
        return key & 0xFFFFFFFFFFFFFFFF
    if type(key) is bytes:
        return key_to_u64(key)
    raise TypeError(f"index keys must be int or bytes, got {type(key).__name__}")


class HashIndex:
    """Open-addressing map from chunk keys to integer store slots, with probe statistics.

    `on_collision(key, slot)` runs after a new key lands at `slot`, away from its home slot;
    `on_resize(old_capacity, new_capacity)` runs after each growth (a doubling, or several at
    once where a tiny max_load_factor needs them).
    """

    def __init__(
        self,
        config: Optional[IndexConfig] = None,
        *,
        on_collision: Optional[Callable[[IndexKey, int], None]] = None,
        on_resize: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.config = config or IndexConfig()
        self.on_collision = on_collision
        self.on_resize = on_resize
        self._timing = self.config.timing
        self.collisions = self.resizes = self.lookups = self.hits = self.lookup_ns = 0
        self._allocate(self.config.initial_capacity)
        self._size = 0

    def _allocate(self, capacity: int) -> None:
        self._capacity = capacity
        self._mask = capacity - 1
        self._home = slot_function(self.config.hash, capacity)
        self._keys: list[Optional[IndexKey]] = [None] * capacity
        self._codes: list[int] = [0] * capacity
        self._values: list[int] = [0] * capacity

    def _probe(self, key: IndexKey, code: int) -> int:
        """The slot holding `key`, or ~slot of the empty slot that ends its probe run."""
        keys, mask = self._keys, self._mask
        slot = self._home(code)
        while True:
            found = keys[slot]
            if found is None:
                return ~slot
            if found == key:
                return slot
            slot = (slot + 1) & mask

    # -- mapping API -------------------------------------------------------------------------

    def put(self, key: IndexKey, value: int) -> None:
        """Map `key` to `value` (a store slot), replacing any earlier value."""
        if type(value) is not int:
            raise TypeError(f"index values must be int store slots, got {type(value).__name__}")
        code = _code(key)
        slot = self._probe(key, code)
        if slot >= 0:
            self._values[slot] = value
            return
        if self._size + 1 > self.config.max_load_factor * self._capacity:
            capacity = self._capacity * 2
            while self._size + 1 > self.config.max_load_factor * capacity:
                capacity *= 2
            self._grow(capacity)
            slot = self._probe(key, code)
        slot = ~slot
        self._keys[slot], self._codes[slot], self._values[slot] = key, code, value
        self._size += 1
        if slot != self._home(code):
            self.collisions += 1
            if self.on_collision is not None:
                self.on_collision(key, slot)

    insert = put

    def get(self, key: IndexKey, default: Optional[int] = None) -> Optional[int]:
        """The value of `key`, or `default` on a miss; counted in the hit-rate statistics."""
        if self._timing:
            start = time.perf_counter_ns()
            slot = self._probe(key, _code(key))
            self.lookup_ns += time.perf_counter_ns() - start
        else:
            slot = self._probe(key, _code(key))
        self.lookups += 1
        if slot < 0:
            return default
        self.hits += 1
        return self._values[slot]

    lookup = get

    def delete(self, key: IndexKey) -> bool:
        """Remove `key`; False if it was absent. Later entries of the probe run shift back into
        the hole, so every remaining key stays reachable without tombstones."""
        hole = self._probe(key, _code(key))
        if hole < 0:
            return False
        keys, codes, values, mask = self._keys, self._codes, self._values, self._mask
        slot = hole
        while True:
            slot = (slot + 1) & mask
            if keys[slot] is None:
                break
            home = self._home(codes[slot])
            if (slot - home) & mask >= (slot - hole) & mask:
                keys[hole], codes[hole], values[hole] = keys[slot], codes[slot], values[slot]
                hole = slot
        keys[hole] = None
        self._size -= 1
        return True

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        if type(key) is not int and type(key) is not bytes:
            return False
        return self._probe(key, _code(key)) >= 0

    def items(self) -> Iterator[tuple[IndexKey, int]]:
        """(key, value) pairs in table order."""
        for key, value in zip(self._keys, self._values):
            if key is not None:
                yield key, value

    def __iter__(self) -> Iterator[IndexKey]:
        return (key for key, _ in self.items())

    def locate(self, key: IndexKey) -> Optional[tuple[int, int]]:
        """(table slot, probe length) of `key`, or None. The slot moves on resize: it is for
        diagnostics and the fibkvc compatibility layer, not a stable store slot."""
        code = _code(key)
        slot = self._probe(key, code)
        if slot < 0:
            return None
        return slot, ((slot - self._home(code)) & self._mask) + 1

    # -- growth and statistics ---------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def load_factor(self) -> float:
        return self._size / self._capacity

    def _grow(self, capacity: int) -> None:
        old_capacity = self._capacity
        entries = [(k, c, v) for k, c, v in zip(self._keys, self._codes, self._values) if k is not None]
        self._allocate(capacity)
        self._place_all(entries)
        self.resizes += 1
        if self.on_resize is not None:
            self.on_resize(old_capacity, self._capacity)

    def _place_all(self, entries: list[tuple[IndexKey, int, int]]) -> None:
        """Place distinct entries known to fit, in order, without statistics or callbacks."""
        keys, codes, values, mask = self._keys, self._codes, self._values, self._mask
        for key, code, value in entries:
            slot = self._home(code)
            while keys[slot] is not None:
                slot = (slot + 1) & mask
            keys[slot], codes[slot], values[slot] = key, code, value

    def probe_lengths(self) -> list[int]:
        """Slots a successful lookup examines, for every stored key (1 = found at home)."""
        mask = self._mask
        return [
            ((slot - self._home(code)) & mask) + 1
            for slot, (key, code) in enumerate(zip(self._keys, self._codes))
            if key is not None
        ]

    def stats(self) -> dict[str, Any]:
        """Size, load, collisions, probe lengths of the stored keys, lookup hit rate and latency."""
        lengths = self.probe_lengths()
        return {
            "size": self._size,
            "capacity": self._capacity,
            "load_factor": self.load_factor,
            "hash": self.config.hash,
            "collisions": self.collisions,
            "resizes": self.resizes,
            "mean_probe_length": sum(lengths) / len(lengths) if lengths else 0.0,
            "max_probe_length": max(lengths, default=0),
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.hits / self.lookups if self.lookups else None,
            "mean_lookup_ns": self.lookup_ns / self.lookups if self.config.timing and self.lookups else None,
        }

    # -- persistence -------------------------------------------------------------------------

    def _ordered_entries(self) -> list[tuple[IndexKey, int]]:
        """Entries in table order starting just after an empty slot: re-inserting them in this
        order into a table of the same capacity rebuilds exactly the same layout."""
        start = self._keys.index(None)
        order = range(start + 1, start + 1 + self._capacity)
        return [(self._keys[i & self._mask], self._values[i & self._mask]) for i in order
                if self._keys[i & self._mask] is not None]

    def to_json(self) -> str:
        """Plain JSON: config, capacity, entries (bytes keys as hex strings) and a checksum."""
        body = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.model_dump(),
            "capacity": self._capacity,
            "entries": [[key.hex() if type(key) is bytes else key, value] for key, value in self._ordered_entries()],
        }
        return json.dumps({**body, "checksum": _checksum(body)}, separators=(",", ":"))

    @classmethod
    def from_json(
        cls,
        text: str,
        *,
        on_collision: Optional[Callable[[IndexKey, int], None]] = None,
        on_resize: Optional[Callable[[int, int], None]] = None,
    ) -> "HashIndex":
        """Rebuild a saved index (statistics start afresh); ValueError naming what is wrong."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"hash index file is not valid JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not a kvpatch hash index (expected format {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise ValueError(f"hash index format version {doc.get('version')!r} is not supported (expected {VERSION})")
        body = {k: v for k, v in doc.items() if k != "checksum"}
        if doc.get("checksum") != _checksum(body):
            raise ValueError("hash index checksum mismatch: the file is corrupt or was edited")
        try:
            config = IndexConfig.model_validate(doc["config"])
            capacity = power_of_two(doc["capacity"])
            entries = [_decode_entry(entry) for entry in doc["entries"]]
        except (KeyError, TypeError, ValueError, ValidationError) as err:
            raise ValueError(f"malformed hash index file: {err}") from None
        if len(entries) > config.max_load_factor * capacity:
            raise ValueError(
                f"hash index file holds {len(entries)} entries, over the load limit of capacity {capacity}")
        if len({(type(key), key) for key, _ in entries}) != len(entries):
            raise ValueError("hash index file repeats a key")
        index = cls(config, on_collision=on_collision, on_resize=on_resize)
        index._allocate(capacity)
        index._place_all([(key, _code(key), value) for key, value in entries])
        index._size = len(entries)
        return index

    def save(self, path: Union[str, os.PathLike[str]]) -> None:
        """Write `to_json()` atomically: a crash leaves the old file or the new one, never half."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike[str]],
        *,
        on_collision: Optional[Callable[[IndexKey, int], None]] = None,
        on_resize: Optional[Callable[[int, int], None]] = None,
    ) -> "HashIndex":
        """Read a file written by `save`; ValueError if it is corrupt or not an index."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"hash index file {path} is not UTF-8 text") from None
        return cls.from_json(text, on_collision=on_collision, on_resize=on_resize)


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _decode_entry(entry: Any) -> tuple[IndexKey, int]:
    key, value = entry
    if type(value) is not int:
        raise ValueError(f"entry value {value!r} is not an int")
    if isinstance(key, str):
        return bytes.fromhex(key), value
    if type(key) is not int:
        raise ValueError(f"entry key {key!r} is neither an int nor a hex string")
    return key, value
