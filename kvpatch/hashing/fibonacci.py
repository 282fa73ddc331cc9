"""Fibonacci (multiplicative) hashing in Knuth's 64-bit integer form, and the modulo baseline.

`fibonacci_hash` multiplies the key by 2^64/phi (odd, so the map is a bijection mod 2^64) and keeps
the top log2(table_size) bits of the 64-bit product. The top bits depend on every bit of the key,
so keys that differ only in their high bits (strided keys, e.g. multiples of 2^16) still spread,
where `modulo_hash` on a power-of-two table keeps only the low bits and piles them onto one slot.
Everything is integer arithmetic: no floats, and never Python's `hash()` (salted per process).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Literal, Union

#: floor(2^64 / phi), Knuth's multiplier for 64-bit Fibonacci hashing.
GOLDEN_MULTIPLIER = 11400714819323198485
MASK64 = (1 << 64) - 1

Key = Union[int, str, bytes]
HashMethod = Literal["fibonacci", "modulo"]


def table_bits(table_size: int) -> int:
    """log2 of `table_size`; a clear ValueError unless it is a power-of-two int >= 1."""
    if type(table_size) is not int or table_size < 1 or table_size & (table_size - 1):
        raise ValueError(f"table_size must be a power-of-two int >= 1, got {table_size!r}")
    return table_size.bit_length() - 1


def key_to_u64(key: Key) -> int:
    """The 64-bit integer a key hashes as: ints modulo 2^64 (so a negative int64 and its unsigned
    twin agree), str as UTF-8 bytes, bytes as the first 8 bytes (little-endian) of their BLAKE2b
    digest, which is the same in every process, unlike `hash()`."""
    if isinstance(key, int):
        return key & MASK64
    if isinstance(key, str):
        key = key.encode()
    if isinstance(key, (bytes, bytearray, memoryview)):
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    raise TypeError(f"hash keys must be int, str or bytes, got {type(key).__name__}")


def fibonacci_hash(key: Key, table_size: int) -> int:
    """Slot of `key` in a power-of-two table: the top log2(table_size) bits of key * 2^64/phi."""
    return slot_function("fibonacci", table_size)(key_to_u64(key))


def modulo_hash(key: Key, table_size: int) -> int:
    """The baseline: key mod table_size. Power-of-two sizes only, as in the index, where this
    keeps only the key's low bits (the weakness Fibonacci hashing removes)."""
    return slot_function("modulo", table_size)(key_to_u64(key))


def slot_function(method: HashMethod, table_size: int) -> Callable[[int], int]:
    """A one-argument slot function over already-reduced 64-bit codes, with the table size
    checked once, for the index's hot path."""
    shift = 64 - table_bits(table_size)
    if method == "fibonacci":
        def fibonacci_slot(code: int) -> int:  # a closure: about twice as fast as a partial
            return ((code * GOLDEN_MULTIPLIER) & MASK64) >> shift

        return fibonacci_slot
    if method == "modulo":
        return (table_size - 1).__and__
    raise ValueError(f"hash must be 'fibonacci' or 'modulo', got {method!r}")
