"""Honest byte counts for cached tensors.

`t.nbytes` undercounts views (a cropped or sliced cache keeps its whole buffer alive) and
double-counts tensors that share storage, so we sum each distinct underlying storage once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def storage_bytes_by_device(
    tensors: Iterable[torch.Tensor | None], exclude: Iterable[torch.Tensor | None] = (),
) -> dict[str, int]:
    """Bytes of the distinct storages behind `tensors`, per device (e.g. {'cuda:0': n, 'cpu': m}),
    leaving out storages that any tensor of `exclude` also uses (e.g. offloaded copies, so that
    the rest is what stays resident)."""
    seen = {_storage_key(t) for t in exclude if t is not None}
    totals: dict[str, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        totals[key[0]] = totals.get(key[0], 0) + tensor.untyped_storage().nbytes()
    return totals
