"""`StaticDenseLayer`: full-precision K/V in a preallocated buffer with a device-side length.

Decode is memory-bound, and at small batch an eager step is launch-bound; the fast path is one
CUDA-graph replay per step (kvpatch/patch/decode_graphs.py). A graph replays fixed kernels with
fixed arguments, so the cache may neither change a tensor's shape nor ask the host anything
during a step. transformers' `DynamicLayer` concatenates (new shapes every step); its
`StaticLayer` keeps fixed buffers but hands attention the whole buffer and a mask over it, so
attention reads every slot whatever the length. This layer keeps:
- `buffer_keys/buffer_values` `[B, H, capacity, D]`, valid up to `counts[2]` (a device int64,
  the `PackedKV.counts` convention of a residual ring that starts at slot 0);
- `keys/values` = views of the valid prefix, as `DynamicLayer` has them, so every other part of
  kvpatch (snapshots, reuse, byte counts) reads it as it reads a dense layer; code that assigns
  `keys/values` (crop, batch selection, reuse splicing) is picked up at the next update.
A decode step (few tokens) writes at the device counter and hands attention the buffer with its
count (`PackedKV`), so the fused kernel reads only the valid tokens; prefill writes with host
slicing and returns the views. The buffer grows by reallocation when a forward would not fit
(a captured graph is then captured anew); `capacity_tokens` preallocates.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ..compat import init_empty_layer, query_length
from ..kernels.packed import PackedKV

#: Forwards of at most this many tokens per row are decode steps (the fused kernel's query limit).
DECODE_MAX_TOKENS = 16
#: Slots are allocated in multiples of this (a capacity change means a new graph: keep them rare).
CAPACITY_ALIGN = 256


def grown_capacity(needed: int, requested: int | None) -> int:
    """Slots for `needed` tokens: `requested` if it holds them, else `needed` plus an eighth
    (at least 256 decode steps of headroom), aligned."""
    if requested is not None and requested >= needed:
        return requested
    target = needed + max(CAPACITY_ALIGN, needed // 8)
    return -(-target // CAPACITY_ALIGN) * CAPACITY_ALIGN


class StaticDenseLayer(DynamicLayer):
    """A `DynamicLayer` whose decode steps have fixed shapes and keep their length on the device."""

    def __init__(self, capacity_tokens: int | None = None) -> None:
        super().__init__()
        self.capacity_tokens = capacity_tokens
        self.buffer_keys: torch.Tensor | None = None
        self.buffer_values: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        init_empty_layer(self, key_states, key_states if value_states is None else value_states)

    @property
    def capacity(self) -> int:
        return 0 if self.buffer_keys is None else self.buffer_keys.shape[-2]

    # -- keeping the buffer and the views in step -------------------------------------------------

    def _views_current(self) -> bool:
        """Whether `keys/values` are still the views this layer made (nobody assigned new ones)."""
        k = self.keys
        return (self.buffer_keys is not None and k is not None and k.shape[-2] == self.length
                and k.data_ptr() == self.buffer_keys.data_ptr() and k.shape[:2] == self.buffer_keys.shape[:2]
                and self.values is not None and self.values.data_ptr() == self.buffer_values.data_ptr())

    def _arm(self, new_tokens: int) -> None:
        """Make the buffer hold the current `keys/values` plus `new_tokens` more."""
        if self._views_current() and self.length + new_tokens <= self.capacity:
            return
        keys, values = self.keys, self.values
        tokens = keys.shape[-2]
        needed = tokens + new_tokens
        if self.buffer_keys is None or needed > self.capacity or keys.shape[:2] != self.buffer_keys.shape[:2] \
                or keys.shape[-1] != self.buffer_keys.shape[-1]:
            shape = (*keys.shape[:2], grown_capacity(needed, self.capacity_tokens), keys.shape[-1])
            buffer_keys, buffer_values = keys.new_zeros(shape), values.new_zeros((*shape[:3], values.shape[-1]))
        else:
            buffer_keys, buffer_values = self.buffer_keys, self.buffer_values
        if tokens:  # a copy: `keys` may be a view of the old buffer (crop) or of anything else
            buffer_keys[..., :tokens, :] = keys
            buffer_values[..., :tokens, :] = values
        self.buffer_keys, self.buffer_values = buffer_keys, buffer_values
        if self.counts is None or self.counts.device != keys.device:
            self.counts = torch.zeros(3, dtype=torch.int64, device=keys.device)
        self.counts[2].fill_(tokens)
        self._set_length(tokens)

    def _set_length(self, tokens: int) -> None:
        self.length = tokens
        self.keys = self.buffer_keys[..., :tokens, :]
        self.values = self.buffer_values[..., :tokens, :]

    # -- cache layer interface ---------------------------------------------------------------------

    @torch.compiler.disable  # the host mirror changes every step: a compiled decoder must not guard on it
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[-2]
        self._arm(new_tokens)
        if new_tokens > DECODE_MAX_TOKENS:
            begin = self.length
            self.buffer_keys[..., begin : begin + new_tokens, :] = key_states
            self.buffer_values[..., begin : begin + new_tokens, :] = value_states
            self.counts[2:3].add_(new_tokens)
            self._set_length(begin + new_tokens)
            return self.keys, self.values
        slots = self.counts[2] + torch.arange(new_tokens, device=self.counts.device)
        self.buffer_keys.index_copy_(2, slots, key_states)
        self.buffer_values.index_copy_(2, slots, value_states)
        self.counts[2:3].add_(new_tokens)
        self._set_length(self.length + new_tokens)
        packed = PackedKV(self.buffer_keys, self.buffer_values, counts=self.counts,
                          host_counts=(0, 0, self.length))
        return packed, packed

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        """Decode masks span the whole buffer (fixed shape for a graph; the kernel reads them only
        up to the valid length); prefill masks span the valid tokens, as `DynamicLayer`'s do."""
        q_len = query_length(query)
        if q_len <= DECODE_MAX_TOKENS and self.length + q_len <= self.capacity and self._views_current():
            return self.capacity, 0
        return self.length + q_len, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[-2]

    def reset(self) -> None:
        self.buffer_keys = self.buffer_values = self.counts = None
        self.length = 0
        super().reset()

    def kv_tensors(self) -> list[torch.Tensor | None]:
        """The buffers: their whole capacity is resident, whatever the valid length."""
        if self.buffer_keys is None or not self._views_current():
            return [self.keys, self.values]
        return [self.buffer_keys, self.buffer_values]

    # -- graph steps (kvpatch.cache.GraphStepLayer) -------------------------------------------------

    def graph_step_problem(self, new_tokens: int) -> str | None:
        if not self._views_current():
            return "the layer has not run a forward since its K/V were replaced"
        if self.length + new_tokens > self.capacity:
            return f"the buffer is full ({self.capacity} tokens): it grows on an eager step"
        return None

    def graph_buffers(self) -> tuple[int, ...]:
        return (self.buffer_keys.data_ptr(), self.buffer_values.data_ptr(), self.counts.data_ptr(), self.capacity)

    def host_state(self) -> int:
        return self.length

    def restore_host_state(self, state: Any) -> None:
        self._set_length(int(state))

    def advance_host(self, new_tokens: int) -> None:
        self._set_length(self.length + new_tokens)
