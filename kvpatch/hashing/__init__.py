"""Chunk-key hashing: Fibonacci hashing, an open-addressing index (Python and batched torch),
and a fibkvc-compatible surface. See docs/hashing.md."""

from .compat import FibonacciCacheOptimizer, FibonacciHashingConfig
from .fibonacci import GOLDEN_MULTIPLIER, fibonacci_hash, key_to_u64, modulo_hash
from .index import HashIndex, IndexConfig
from .tensor_index import EMPTY, TensorIndex, fibonacci_hash_tensor, keys_tensor

__all__ = [
    "EMPTY",
    "GOLDEN_MULTIPLIER",
    "FibonacciCacheOptimizer",
    "FibonacciHashingConfig",
    "HashIndex",
    "IndexConfig",
    "TensorIndex",
    "fibonacci_hash",
    "fibonacci_hash_tensor",
    "key_to_u64",
    "keys_tensor",
    "modulo_hash",
]
