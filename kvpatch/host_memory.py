"""Host buffers for copies off the accelerator: page-locked when asked, pageable when the host
has no page-locked memory left (or no allocator for it).

Pinned memory is what makes device-to-host copies asynchronous, but it is a limited resource:
the OS cannot swap it, and drivers cap it. Running out must not fail a generate midway, so the
buffer falls back to ordinary memory (copies into it are synchronous, the values the same) and
the process is told once, with a `PinnedMemoryWarning`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

import torch


class PinnedMemoryWarning(ResourceWarning):
    """Page-locked host memory ran out; kvpatch continues with pageable buffers (slower copies)."""


_lock = threading.Lock()
_fallbacks = 0


def host_empty(shape: Sequence[int], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised CPU tensor, pinned if `pin` and the host can still pin it."""
    if pin:
        try:
            return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
        except RuntimeError as err:  # cudaErrorMemoryAllocation, or no pinned allocator at all
            _fell_back(err)
    return torch.empty(tuple(shape), dtype=dtype)


def pinned_fallbacks() -> int:
    """How many buffers were asked pinned but allocated pageable in this process."""
    return _fallbacks


def _fell_back(err: RuntimeError) -> None:
    global _fallbacks
    with _lock:
        _fallbacks += 1
        first = _fallbacks == 1
    if first:
        warnings.warn(f"could not allocate page-locked host memory ({str(err).splitlines()[0]}); kvpatch continues "
                      "with pageable buffers: host copies become synchronous, values are unchanged",
                      PinnedMemoryWarning, stacklevel=3)
