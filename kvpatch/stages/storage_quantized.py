"""`storage/quantized`: older tokens as quantizer codes, recent tokens in full precision.

The layer keeps a full-precision residual window of the most recent `residual_length` tokens
(KIVI's window; recent tokens get the most attention) and moves tokens beyond it into codes in
whole blocks, so each token is quantized exactly once: appending never re-quantizes the cache
(transformers' QuantizedCache does, every `residual_length` tokens). Attention sees the decoded
codes followed by the residual; the tokens of the current forward are always full precision.

In decode (a few new tokens) `update` returns the stored parts undecoded (`PackedKV`, the same
object as key and value): a fused kernel (`kernels: {attention: triton}`) reads the codes packed,
every other kernel calls `dense()`, which is what the layer returned before.

Sliding-window layers stay dense (they are bounded by their window already).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)

from ..compat import init_empty_layer, query_length
from ..kernels.packed import PackedKV
from ..model_shapes import ModelShapes
from ..cache import LayerLayout
from ..quant.base import QuantizerStage
from ..quant.codes import Codes
from ..quant.kernel_layouts import KiviPacking
from ..registry import Stage, first_stage_of, register_stage
from ..stage_specs.storage_quantized import QuantizedStorageParams

#: Forwards of at most this many new tokens get `PackedKV` from `update` (decode, speculative).
PACKED_MAX_QUERY = 16


def flush_block(quantizer: QuantizerStage) -> int:
    """Tokens a layer encodes at once: a whole block of keys and of values."""
    return math.lcm(quantizer.block_tokens("key"), quantizer.block_tokens("value"))


def static_residual_problem(residual_length: int, block: int) -> str | None:
    """Why preallocated (`capacity_tokens`) layers cannot keep this residual window (None: they can):
    their ring of residual slots flushes whole blocks."""
    if residual_length % block:
        return (f"residual_length ({residual_length}) must be a multiple of the quantizer's block "
                f"({block} tokens) when capacity_tokens is set")
    return None


class QuantizedLayer(DynamicLayer):
    """A cache layer of (codes, residual): `keys`/`values` hold only the residual window."""

    def __init__(self, quantizer: QuantizerStage, residual_length: int, sink_tokens: int = 0,
                 compile_decode: bool = False) -> None:
        super().__init__()
        self.quantizer = quantizer
        self._decode = quantizer.compiled_decode if compile_decode else quantizer.decode
        self.residual_length = residual_length
        self.sink_tokens = sink_tokens
        #: The first `sink_tokens` tokens, never quantized: attention sinks have outlier keys that
        #: would both lose their own precision and inflate their group's scales.
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        #: Tokens are quantized in multiples of this (KIVI keys share scales across a group).
        self.flush_block = flush_block(quantizer)
        self.key_codes: Codes | None = None
        self.value_codes: Codes | None = None
        #: encode(x, role, enabled=None) -> Codes in place of the quantizer's (`use_triton_encode`);
        #: `enabled` is a device flag that skips the work when 0.
        self._encode: Callable[..., Codes] | None = None

    @property
    def quantized_tokens(self) -> int:
        return self.key_codes.num_tokens if self.key_codes is not None else 0

    @property
    def sink_length(self) -> int:
        return self.sink_keys.shape[-2] if self.sink_keys is not None else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        init_empty_layer(self, key_states, key_states if value_states is None else value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        take = min(self.sink_tokens - self.sink_length, key_states.shape[-2])
        if take > 0:
            new_sink_k, key_states = key_states[..., :take, :].clone(), key_states[..., take:, :]
            new_sink_v, value_states = value_states[..., :take, :].clone(), value_states[..., take:, :]
            self.sink_keys = new_sink_k if self.sink_keys is None else torch.cat([self.sink_keys, new_sink_k], dim=-2)
            self.sink_values = new_sink_v if self.sink_values is None else torch.cat([self.sink_values, new_sink_v], dim=-2)
        new_tokens = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        # taken before the flush: the tokens of this forward are seen in full precision
        packed = self.packed()
        self._flush()
        if packed.key_codes is not None and new_tokens <= PACKED_MAX_QUERY:
            return packed, packed  # type: ignore[return-value]
        return packed.dense()

    def use_triton_encode(self) -> None:
        """Encode flushed blocks with the one-launch Triton kernel (bitwise the same codes);
        called by the fused attention path, which knows Triton runs on these tensors."""
        from ..kernels.triton_quantize import (
            kivi_encode,  # imports triton: only when it runs
        )

        layout = self.quantizer.kernel_layout()
        if isinstance(layout, KiviPacking) and self._encode is None:
            self._encode = lambda x, role, enabled=None: kivi_encode(x, role, layout.bits, layout.group_size,
                                                                     enabled=enabled)

    def _flush(self) -> None:
        """Quantize the oldest residual tokens beyond the window, in whole blocks."""
        excess = self.keys.shape[-2] - self.residual_length
        count = (excess // self.flush_block) * self.flush_block
        if count <= 0:
            return
        encode = self._encode or self.quantizer.encode
        new_k = encode(self.keys[..., :count, :], "key")
        new_v = encode(self.values[..., :count, :], "value")
        self.key_codes = new_k if self.key_codes is None else Codes.cat([self.key_codes, new_k])
        self.value_codes = new_v if self.value_codes is None else Codes.cat([self.value_codes, new_v])
        # clone: a slice would keep the whole old residual buffer alive.
        self.keys = self.keys[..., count:, :].clone()
        self.values = self.values[..., count:, :].clone()

    def materialize(self) -> None:
        """Plain tensors cut to the stored tokens (what snapshots read): already so here;
        the static layer (`capacity_tokens`) moves its buffers back into this form."""

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_length + self.quantized_tokens + self.keys.shape[-2]

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length(query), 0

    def kv_tensors(self) -> list[torch.Tensor | None]:
        codes = [t for c in (self.key_codes, self.value_codes) if c is not None for t in c.storage_tensors()]
        return [*codes, self.sink_keys, self.sink_values, self.keys, self.values]

    def packed(self) -> PackedKV:
        """The stored parts as they are (sinks, codes, residual), for fused kernels."""
        return PackedKV(self.keys, self.values, self.sink_keys, self.sink_values, self.key_codes,
                        self.value_codes, self.quantizer, self._decode, self)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens in order (sinks, decoded codes, residual) in the cache's dtype: what
        attention reads on the torch path; also used by crop, inspection and snapshots."""
        return self.packed().dense()

    def _map_all(self, fn_tensor, fn_codes) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn_tensor(self.keys), fn_tensor(self.values)
        if self.sink_keys is not None:
            self.sink_keys, self.sink_values = fn_tensor(self.sink_keys), fn_tensor(self.sink_values)
        if self.key_codes is not None:
            self.key_codes, self.value_codes = fn_codes(self.key_codes), fn_codes(self.value_codes)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_all(lambda t: t.index_select(0, beam_idx.to(t.device)), lambda c: c.select_batch(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = torch.as_tensor(indices, device=self.keys.device if self.keys is not None else None)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        self._map_all(lambda t: t.index_select(0, index.to(t.device)), lambda c: c.select_batch(index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_all(lambda t: t.repeat_interleave(repeats, dim=0), lambda c: c.repeat_batch(repeats))

    def offload(self) -> None:
        self._map_all(lambda t: t.to("cpu", non_blocking=True), lambda c: c.to("cpu"))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map_all(lambda t: t.to(self.device, non_blocking=True), lambda c: c.to(self.device))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens. Inside the residual this is exact; cutting into the codes decodes
        them and re-encodes what remains (used by assisted decoding only)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop expects a negative number of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        if remove <= self.keys.shape[-2]:
            self.keys, self.values = self.keys[..., :-remove, :], self.values[..., :-remove, :]
            return
        keys, values = self.decoded()
        self.key_codes = self.value_codes = self.sink_keys = self.sink_values = None
        self.keys, self.values = keys[..., :0, :], values[..., :0, :]
        self.update(keys[..., :-remove, :], values[..., :-remove, :])

    def reset(self) -> None:
        self.key_codes = self.value_codes = self.sink_keys = self.sink_values = None
        super().reset()


@register_stage("storage", "quantized")
class QuantizedStorage(Stage):
    """Stores K/V as the config's quantizer codes, with a full-precision window of recent tokens."""

    Params = QuantizedStorageParams
    params: QuantizedStorageParams

    def __init__(self, params: QuantizedStorageParams) -> None:
        super().__init__(params)
        self.quantizer: QuantizerStage | None = None

    def connect(self, stages: Sequence[Stage]) -> None:
        self.quantizer = first_stage_of(stages, QuantizerStage, "storage/quantized")

    def model_problems(self, shapes: ModelShapes) -> list[str]:
        if self.params.capacity_tokens is None or self.quantizer is None:
            return []
        problem = static_residual_problem(self.params.residual_length, flush_block(self.quantizer))
        return [problem] if problem else []

    def make_layer(self, layout: LayerLayout) -> CacheLayerMixin:
        if layout.sliding_window is not None:
            return DynamicSlidingWindowLayer(sliding_window=layout.sliding_window)
        if self.quantizer is None:
            raise RuntimeError("storage/quantized was not connected to its pipeline's quantizer")
        if self.params.capacity_tokens is not None:
            from .storage_quantized_static import StaticQuantizedLayer

            return StaticQuantizedLayer(self.quantizer, self.params.residual_length, self.params.sink_tokens,
                                        self.params.compile_decode, self.params.capacity_tokens)
        return QuantizedLayer(self.quantizer, self.params.residual_length, self.params.sink_tokens,
                              self.params.compile_decode)
