"""Hints that let a compiled decoder compile once per phase instead of once per length.

A decode step's cache grows by one token per call. torch.compile specialises on every size it
sees, so without a hint the first decode step compiles for the prompt's length, the second
recompiles for length + 1, and only then does dynamo's automatic dynamic shapes give up on the
length. Marking the growing dimensions dynamic before the call (in the pre-forward hook, outside
the compiled region) makes the first compile of each phase (prefill, decode) the only one.
"""

from __future__ import annotations

from typing import Any

import torch

#: Inputs whose last dimension is the (growing or per-prompt) sequence length.
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")


def mark_growing_dims_dynamic(kwargs: dict[str, Any], cache: Any) -> None:
    """Mark the sequence dimension of the forward's token inputs and of every cache layer's
    full-precision keys and values as dynamic (a soft hint: dynamo may still specialise)."""
    for name in SEQUENCE_INPUTS:
        tensor = kwargs.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[-1] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, tensor.dim() - 1)
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[-2] > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
