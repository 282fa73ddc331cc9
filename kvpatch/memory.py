"""Honest byte counts for cached tensors.

`t.nbytes` undercounts views (a cropped or sliced cache keeps its whole buffer alive) and
double-counts tensors that share storage, so we sum each distinct underlying storage once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def storage_bytes_by_device(tensors: Iterable[torch.Tensor | None]) -> dict[str, int]:
    """Bytes of the distinct storages behind `tensors`, per device (e.g. {'cuda:0': n, 'cpu': m})."""
    seen: set[tuple[str, int]] = set()
    totals: dict[str, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        device = str(tensor.device)
        key = (device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        totals[device] = totals.get(device, 0) + storage.nbytes()
    return totals
