"""Index stages: map chunk keys to store slots. `index/fibonacci` is the open-addressing
`HashIndex`; `index/dict` is a plain Python dict, the baseline it is measured against. Both
implement `reuse.index.ChunkIndex`, so the chunk store takes whichever a config names."""

from __future__ import annotations

from typing import Any, Optional

from ..hashing.index import HashIndex, IndexConfig
from ..registry import Stage, StageParams, register_stage
from ..reuse.index import ChunkKey, DictSlots
from ..stage_specs.index import FibonacciIndexParams

@register_stage("index", "fibonacci")
class FibonacciIndex(Stage):
    """Fibonacci-hashed open-addressing index with probe and hit-rate statistics."""

    Params = FibonacciIndexParams
    params: FibonacciIndexParams

    def __init__(self, params: FibonacciIndexParams) -> None:
        super().__init__(params)
        self.index = HashIndex(IndexConfig(initial_capacity=params.initial_capacity,
                                           max_load_factor=params.max_load_factor, hash="fibonacci"))

    def put(self, key: ChunkKey, slot: int) -> None:
        self.index.put(key, slot)

    def get(self, key: ChunkKey) -> Optional[int]:
        return self.index.get(key)

    def delete(self, key: ChunkKey) -> bool:
        return self.index.delete(key)

    def __len__(self) -> int:
        return len(self.index)

    def stats(self) -> dict[str, Any]:
        return self.index.stats()


@register_stage("index", "dict")
class DictIndex(DictSlots, Stage):
    """A Python dict: the baseline (CPython's dict is fast for scalar lookups)."""

    params: StageParams

    def __init__(self, params: StageParams) -> None:
        Stage.__init__(self, params)
        DictSlots.__init__(self)
