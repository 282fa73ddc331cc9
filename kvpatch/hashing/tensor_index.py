"""A batched, fixed-capacity Fibonacci hash index held in torch tensors (CPU or CUDA).

Same hash as `fibonacci_hash`: torch multiplies int64 modulo 2^64 (two's complement wraparound),
so key * (2^64/phi as int64) has the same 64 bits as the Python product; torch's `>>` on int64 is
arithmetic, so the shifted value is masked to keep only the top bits. Linear probing runs as a
loop over probe steps, each step serving every still-unresolved key of the batch at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

import torch

from .fibonacci import GOLDEN_MULTIPLIER, MASK64, table_bits

#: Marks an empty slot; the one int64 that cannot be a key.
EMPTY = torch.iinfo(torch.int64).min
_GOLDEN_INT64 = GOLDEN_MULTIPLIER - (1 << 64)
_HALF = 1 << 63


def fibonacci_hash_tensor(keys: torch.Tensor, table_size: int) -> torch.Tensor:
    """`fibonacci_hash` of every int64 key, elementwise, on the keys' device."""
    bits = table_bits(table_size)
    if bits == 0:
        return torch.zeros_like(keys)
    return ((keys * _GOLDEN_INT64) >> (64 - bits)) & (table_size - 1)


def keys_tensor(keys: Iterable[int], device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Python ints (unsigned 64-bit chunk keys or signed) as int64 with the same low 64 bits,
    so they hash exactly as in the Python index."""
    return torch.tensor([((k & MASK64) ^ _HALF) - _HALF for k in keys], dtype=torch.int64, device=device)


class TensorIndex:
    """Fixed-capacity int64 -> int64 map; `lookup_many` returns -1 for keys it does not hold."""

    def __init__(
        self, capacity: int, *, device: Union[str, torch.device, None] = None, max_load_factor: float = 0.75
    ) -> None:
        table_bits(capacity)
        if not 0.0 < max_load_factor < 1.0:
            raise ValueError(f"max_load_factor must be in (0, 1), got {max_load_factor!r}")
        self.capacity = capacity
        self.max_load_factor = max_load_factor
        self.keys = torch.full((capacity,), EMPTY, dtype=torch.int64, device=device)
        self.values = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        #: Most slots a lookup of any stored key examines: the bound of every lookup loop.
        self.max_probe_length = 0
        self._size = 0

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def __len__(self) -> int:
        return self._size

    def _as_keys(self, keys: torch.Tensor) -> torch.Tensor:
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise ValueError(f"keys must be a 1-D int64 tensor, got {keys.dtype} of shape {tuple(keys.shape)}")
        return keys.to(self.device)

    def _find(self, keys: torch.Tensor) -> torch.Tensor:
        """Table slot of every key, -1 where absent."""
        mask = self.capacity - 1
        found_at = torch.full_like(keys, -1)
        active = torch.arange(keys.numel(), device=self.device)
        active_keys, home = keys, fibonacci_hash_tensor(keys, self.capacity)
        for step in range(self.max_probe_length):
            if active.numel() == 0:
                break
            slots = (home + step) & mask
            seen = self.keys[slots]
            hit = seen == active_keys
            found_at[active[hit]] = slots[hit]
            keep = torch.nonzero(~hit & (seen != EMPTY)).squeeze(1)
            active, active_keys, home = active[keep], active_keys[keep], home[keep]
        return found_at

    def lookup_many(self, keys: torch.Tensor) -> torch.Tensor:
        """Value of every key (-1 on a miss), on the index's device."""
        slots = self._find(self._as_keys(keys))
        return torch.where(slots >= 0, self.values[slots.clamp(min=0)], -1)

    def insert_many(self, keys: torch.Tensor, values: Union[torch.Tensor, Iterable[int]]) -> None:
        """Insert or update; for a key repeated in the batch the last value wins. Raises
        OverflowError, changing nothing, if the new keys would pass the load limit."""
        keys = self._as_keys(keys)
        values = torch.as_tensor(values, dtype=torch.int64, device=self.device)
        if values.shape != keys.shape:
            raise ValueError(f"got {keys.numel()} keys but values of shape {tuple(values.shape)}")
        if bool((keys == EMPTY).any()):
            raise ValueError(f"{EMPTY} is the empty-slot sentinel and cannot be a key")
        if bool((values < 0).any()):
            raise ValueError("values must be >= 0 (store slots); -1 means a miss")
        unique, inverse = torch.unique(keys, return_inverse=True)
        order = torch.arange(keys.numel(), device=self.device)
        last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, order, "amax")
        keys, values = keys[last], values[last]

        slots = self._find(keys)
        present = slots >= 0
        new_keys, new_values = keys[~present], values[~present]
        if self._size + new_keys.numel() > self.max_load_factor * self.capacity:
            raise OverflowError(f"tensor index of capacity {self.capacity} cannot take {new_keys.numel()} more keys "
                                f"beyond {self._size} at max_load_factor {self.max_load_factor}")
        self.values[slots[present]] = values[present]
        self._place(new_keys, new_values)
        self._size += new_keys.numel()

    def _place(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Linear-probe absent keys in; where several claim one empty slot the earliest wins
        (deterministic on every device) and the rest move on to the next step."""
        mask = self.capacity - 1
        pending = torch.arange(keys.numel(), device=self.device)
        home = fibonacci_hash_tensor(keys, self.capacity)
        for step in range(self.capacity):
            if pending.numel() == 0:
                break
            slots = (home[pending] + step) & mask
            free = torch.nonzero(self.keys[slots] == EMPTY).squeeze(1)
            if free.numel() == 0:
                continue
            claimed, claimant = torch.unique(slots[free], return_inverse=True)
            winner = torch.full_like(claimed, pending.numel()).scatter_reduce_(0, claimant, free, "amin")
            self.keys[claimed] = keys[pending[winner]]
            self.values[claimed] = values[pending[winner]]
            self.max_probe_length = max(self.max_probe_length, step + 1)
            still = torch.ones_like(pending, dtype=torch.bool)
            still[winner] = False
            pending = pending[still]
