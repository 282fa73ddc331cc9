"""`StaticQuantizedLayer`: `storage/quantized` with preallocated buffers and device-side counters.

A CUDA graph replays fixed kernels with fixed arguments, so a decode step can only be captured if
it never changes a tensor's shape and never asks the host anything. The dynamic `QuantizedLayer`
does both (it concatenates, and decides on the host when to flush a block). This layer keeps:
- the codes in buffers of `capacity_tokens` (+1 scratch block), valid up to a device counter;
- the full-precision residual in a ring of `residual_length + 2 * block` slots;
- `counts` = (code blocks, first residual slot, residual tokens) as one device int64 tensor,
  mirrored on the host (`host_counts`) while it runs eagerly; `sync_counts()` re-reads it after
  graph replays.
Each decode step runs the same flush kernels: the oldest residual block is encoded (the Triton
encoder skips the work on the device unless the residual is full; the torch encoder always works)
and written to the first unused code block, and the counters only advance when the residual is
full, so the same kernels run at every step. What attention sees is exactly what the dynamic layer shows
(the flush that the dynamic layer does at the end of a step happens here at the start of the next),
so the two give the same tokens.

Prefill (and any forward of more than one block of tokens) runs the dynamic layer's code and then
moves its state into the buffers.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compat import query_length
from ..errors import ConfigError
from ..kernels.packed import PackedKV
from ..quant.base import QuantizerStage
from ..quant.codes import Codes
from .storage_quantized import PACKED_MAX_QUERY, QuantizedLayer, static_residual_problem


class StaticQuantizedLayer(QuantizedLayer):
    """A `QuantizedLayer` whose decode steps have fixed shapes and keep their state on the device."""

    def __init__(self, quantizer: QuantizerStage, residual_length: int, sink_tokens: int,
                 compile_decode: bool, capacity_tokens: int) -> None:
        super().__init__(quantizer, residual_length, sink_tokens, compile_decode)
        block = self.flush_block
        problem = static_residual_problem(residual_length, block)
        if problem:
            raise ConfigError(f"storage/quantized: {problem}")
        self.capacity_tokens = capacity_tokens
        self.capacity_blocks = -(-capacity_tokens // block)
        self.ring_slots = residual_length + 2 * block
        self.counts: torch.Tensor | None = None
        self.host_counts = [0, 0, 0]
        self.static = False

    # -- the two forms ---------------------------------------------------------------------------

    def _to_static(self) -> None:
        """Move the dynamic state (codes, residual) into fixed-capacity buffers."""
        stored = self.quantized_tokens + self.keys.shape[-2]
        if self.sink_length + stored > self.capacity_tokens:
            raise ConfigError(f"storage/quantized: {self.sink_length + stored} tokens exceed "
                              f"capacity_tokens={self.capacity_tokens}")
        block, device = self.flush_block, self.keys.device
        self.key_codes = self._code_buffer(self.key_codes, "key")
        self.value_codes = self._code_buffer(self.value_codes, "value")
        residual = self.keys.shape[-2]
        batch, heads, _, dim = self.keys.shape
        ring_k = self.keys.new_zeros(batch, heads, self.ring_slots, dim)
        ring_v = self.values.new_zeros(batch, heads, self.ring_slots, self.values.shape[-1])
        ring_k[..., :residual, :], ring_v[..., :residual, :] = self.keys, self.values
        self.keys, self.values = ring_k, ring_v
        self.host_counts = [(stored - residual) // block, 0, residual]
        self.counts = torch.tensor(self.host_counts, dtype=torch.int64, device=device)
        self._slot_range = torch.arange(block, device=device)
        self._advance = torch.tensor([1, block, -block], dtype=torch.int64, device=device)
        self.static = True

    def _code_buffer(self, codes: Codes | None, role: str) -> Codes:
        """`codes` copied to the front of a buffer of `capacity_blocks + 1` blocks (the last is
        scratch: the unconditional flush writes there when the buffer is full)."""
        block = self.flush_block
        if codes is None:  # shapes and dtypes from encoding one empty block
            template = self.keys.new_zeros(*self.keys.shape[:2], block, self.keys.shape[-1])
            codes = self.quantizer.encode(template, role).slice_blocks(0, 0)
        rows = (self.capacity_blocks + 1) * block // codes.block_tokens
        buffers = {}
        for name, t in codes.tensors.items():
            buffer = t.new_zeros(*t.shape[:2], rows, *t.shape[3:])
            buffer[:, :, : t.shape[2]] = t
            buffers[name] = buffer
        return Codes(buffers, codes.block_tokens, codes.dim)

    def materialize(self) -> None:
        """Back to the dynamic form (plain tensors cut to the stored tokens): for crop,
        snapshots, and forwards longer than one block. The next decode step re-arms."""
        if not self.static:
            return
        packed = self.packed()
        self.keys, self.values = packed.residual()
        key_codes, value_codes = packed.valid_codes()
        has_codes = key_codes.num_blocks > 0
        self.key_codes = key_codes.clone() if has_codes else None
        self.value_codes = value_codes.clone() if has_codes else None
        self.counts, self.static = None, False
        self._flush()  # the flush this layer defers to the next step, done now as the dynamic layer has

    def sync_counts(self) -> None:
        """Re-read the device counters (after CUDA-graph replays, which skip the host mirror)."""
        if self.static:
            self.host_counts = [int(x) for x in self.counts.tolist()]

    # -- cache layer interface -------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        new_tokens = key_states.shape[-2]
        if self.static and new_tokens > self.flush_block:
            self.materialize()
        if not self.static:
            out = super().update(key_states, value_states)
            if self.sink_length == self.sink_tokens:
                self._to_static()
            return out
        problem = self._full_problem(new_tokens)
        if problem:
            raise ConfigError(f"storage/quantized: {problem}")
        self._flush_oldest_block()
        self._append(key_states, value_states)
        self.advance_host(new_tokens)
        packed = self.packed()
        return (packed, packed) if new_tokens <= PACKED_MAX_QUERY else packed.dense()

    def _flush_oldest_block(self) -> None:
        """Encode the oldest residual block into the first unused code block; advance the counters
        only if the residual holds `residual_length + block` tokens (the dynamic layer's flush)."""
        block = self.flush_block
        slots = self.counts[1] + self._slot_range
        full = (self.counts[2] >= self.residual_length + block).to(torch.int64)
        for role, ring, codes in (("key", self.keys, self.key_codes), ("value", self.values, self.value_codes)):
            x = ring.index_select(2, slots)
            # the Triton encoder skips its work on the device when the block is not full
            new = self._encode(x, role, enabled=full) if self._encode else self.quantizer.encode(x, role)
            rows = block // codes.block_tokens
            target = self.counts[0] * rows + self._slot_range[:rows]
            for name, t in new.tensors.items():
                codes.tensors[name].index_copy_(2, target, t)
        self.counts.add_(full * self._advance)
        self.counts[1:2].remainder_(self.ring_slots)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        new_tokens = key_states.shape[-2]
        slots = (self.counts[1] + self.counts[2] + self._slot_range[:new_tokens]) % self.ring_slots
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.counts[2:3].add_(new_tokens)

    def _full_problem(self, new_tokens: int) -> str | None:
        blocks, _, count = self.host_counts
        if count >= self.residual_length + self.flush_block:  # the step's flush frees a block first
            blocks, count = blocks + 1, count - self.flush_block
        if self.sink_length + blocks * self.flush_block + count + new_tokens > self.capacity_tokens:
            return f"the cache is full (capacity_tokens={self.capacity_tokens})"
        return None

    def advance_host(self, new_tokens: int) -> None:
        """The host mirror of one decode step's counters: the flush, then the append."""
        blocks, first, count = self.host_counts
        block = self.flush_block
        if count >= self.residual_length + block:
            blocks, first, count = blocks + 1, (first + block) % self.ring_slots, count - block
        self.host_counts = [blocks, first, count + new_tokens]

    # -- graph steps (kvpatch.cache.GraphStepLayer) -------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.capacity_tokens

    def graph_step_problem(self, new_tokens: int) -> str | None:
        if not self.static:
            return "the layer has not reached its static form (it arms after the prefill)"
        if new_tokens > self.flush_block:
            return f"{new_tokens} tokens are more than one block"
        return self._full_problem(new_tokens)

    def graph_buffers(self) -> tuple[int, ...]:
        tensors = [self.keys, self.values, self.counts, *self.key_codes.tensors.values(),
                   *self.value_codes.tensors.values()]
        if self.sink_keys is not None:
            tensors += [self.sink_keys, self.sink_values]
        return tuple(t.data_ptr() for t in tensors)

    def host_state(self) -> list[int]:
        return list(self.host_counts)

    def restore_host_state(self, state: Any) -> None:
        self.host_counts = list(state)

    def packed(self) -> PackedKV:
        if not self.static:
            return super().packed()
        return PackedKV(self.keys, self.values, self.sink_keys, self.sink_values, self.key_codes, self.value_codes,
                        self.quantizer, self._decode, self, counts=self.counts, host_counts=tuple(self.host_counts))

    @property
    def quantized_tokens(self) -> int:
        if self.static:
            return self.host_counts[0] * self.flush_block
        return super().quantized_tokens

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        """Decode masks span the capacity (a fixed shape for a CUDA graph; the kernel reads them
        only up to the valid tokens)."""
        if self.static and query_length(query) <= self.flush_block:
            return self.capacity_tokens, 0
        return super().get_mask_sizes(query)

    def get_seq_length(self) -> int:
        if self.static:
            return self.sink_length + self.quantized_tokens + self.host_counts[2]
        return super().get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        self.materialize()
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        self.counts, self.static, self.host_counts = None, False, [0, 0, 0]
        super().reset()
