"""What the RAM chunk store needs from an index (`ChunkIndex`) and the plain-dict one it uses
when a config names none (`DictSlots`; the `index/dict` stage is this class)."""

from __future__ import annotations

from typing import Any, Optional, Protocol, Union

ChunkKey = Union[int, bytes]


class ChunkIndex(Protocol):
    """Chunk key -> RAM slot."""

    def put(self, key: ChunkKey, slot: int) -> None: ...
    def get(self, key: ChunkKey) -> Optional[int]: ...
    def delete(self, key: ChunkKey) -> bool: ...
    def __len__(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...


class DictSlots:
    """A Python dict with lookup counts: the baseline (CPython's dict is fast for scalar lookups)."""

    def __init__(self) -> None:
        self._slots: dict[ChunkKey, int] = {}
        self.lookups = self.hits = 0

    def put(self, key: ChunkKey, slot: int) -> None:
        self._slots[key] = slot

    def get(self, key: ChunkKey) -> Optional[int]:
        self.lookups += 1
        slot = self._slots.get(key)
        self.hits += slot is not None
        return slot

    def delete(self, key: ChunkKey) -> bool:
        return self._slots.pop(key, None) is not None

    def __len__(self) -> int:
        return len(self._slots)

    def stats(self) -> dict[str, Any]:
        return {"size": len(self._slots), "lookups": self.lookups, "hits": self.hits,
                "hit_rate": self.hits / self.lookups if self.lookups else None}
