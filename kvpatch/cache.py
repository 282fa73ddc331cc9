"""`KVPatchCache`: the transformers `Cache` that kvpatch installs, and the per-layer layout.

The cache itself is thin: a list of layers built by the pipeline's storage stage. Storage
strategies (dense, quantized, tiered) are layer classes, so the attention function and the
generation loop never special-case them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .memory import storage_bytes_by_device


@dataclass(frozen=True)
class LayerLayout:
    """What one decoder layer's attention needs from its cache layer."""

    layer_idx: int
    sliding_window: int | None = None


def layer_layouts(model_config: Any) -> list[LayerLayout]:
    """Per-layer layout from a model config, mirroring how transformers' DynamicCache reads it."""
    config = model_config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers
    return [
        LayerLayout(layer_idx=i, sliding_window=window if kind == "sliding_attention" else None)
        for i, kind in enumerate(layer_types)
    ]


def layer_kv_tensors(layer: CacheLayerMixin) -> list[torch.Tensor | None]:
    """Every tensor a layer holds for K/V, resident or offloaded (layers with extra buffers
    override `kv_tensors`)."""
    custom = getattr(layer, "kv_tensors", None)
    if callable(custom):
        return list(custom())
    return [layer.keys, layer.values]


def layer_offloaded_kv_tensors(layer: CacheLayerMixin) -> list[torch.Tensor | None]:
    """The part of `layer_kv_tensors` that attention does not read: copies moved off the
    accelerator (layers that offload override `offloaded_kv_tensors`; others hold none)."""
    custom = getattr(layer, "offloaded_kv_tensors", None)
    return list(custom()) if callable(custom) else []


@runtime_checkable
class GraphStepLayer(Protocol):
    """A cache layer whose decode steps can be captured in a CUDA graph and replayed
    (kvpatch/patch/decode_graphs.py): fixed buffers, valid lengths kept on the device, and a host
    mirror of them that the replaying code keeps in step."""

    @property
    def capacity(self) -> int:
        """Token slots of the layer's buffers (a static decode mask is this wide)."""

    def graph_step_problem(self, new_tokens: int) -> str | None:
        """Why the next step of `new_tokens` per row cannot be a replay (None: it can)."""

    def graph_buffers(self) -> tuple[int, ...]:
        """What a captured step bakes in (buffer addresses, sizes): a change means capture anew."""

    def host_state(self) -> Any:
        """The host mirror, saved before a capture (which runs the Python but not the kernels)."""

    def restore_host_state(self, state: Any) -> None:
        """Put back what `host_state` returned."""

    def advance_host(self, new_tokens: int) -> None:
        """After a replay: what the eager step of `new_tokens` does to the host mirror."""


def graph_step_layers(cache: Any) -> list[GraphStepLayer] | None:
    """The cache's layers if every one is a `GraphStepLayer`, else None."""
    layers = list(getattr(cache, "layers", ()))
    if not layers or not all(isinstance(layer, GraphStepLayer) for layer in layers):
        return None
    return layers  # type: ignore[return-value]


#: Which K/V bytes to count: what attention reads, what was moved away, or both.
KVPart = Literal["resident", "offloaded", "all"]


def cache_kv_bytes(cache: Cache, part: KVPart = "all") -> dict[str, int]:
    """K/V bytes per device of any transformers cache (kvpatch's or an unpatched model's
    DynamicCache), each distinct storage counted once: `resident` (attention reads it),
    `offloaded` (host or file copies kept for restoring) or `all` (the two together)."""
    layers = cache.layers
    if part == "offloaded":
        return storage_bytes_by_device(t for layer in layers for t in layer_offloaded_kv_tensors(layer))
    exclude = [t for layer in layers for t in layer_offloaded_kv_tensors(layer)] if part == "resident" else []
    return storage_bytes_by_device((t for layer in layers for t in layer_kv_tensors(layer)), exclude=exclude)


class KVPatchCache(Cache):
    """A transformers Cache whose layers come from a kvpatch storage stage."""

    def __init__(self, layers: list[CacheLayerMixin], owner: object | None = None) -> None:
        super().__init__(layers=layers)
        #: Called as recorder(layer_idx, keys, values) with every update's new K/V (chunk reuse
        #: records a prefill's K/V this way, before sliding layers drop old tokens).
        self.recorder: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        #: The pipeline that made this cache: only its model may run with it (PatchHandle.owns).
        self.owner = owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recorder is not None:
            self.recorder(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def kv_bytes(self, part: KVPart = "all") -> dict[str, int]:
        """K/V bytes per device, all layers (distinct storages counted once); `part` as in
        `cache_kv_bytes`."""
        return cache_kv_bytes(self, part)

    def restore(self) -> None:
        """Bring offloaded K/V back into every layer that keeps some (`evictor/budget` with an
        offloader); a no-op for layers that do not."""
        for layer in self.layers:
            restore = getattr(layer, "restore", None)
            if restore is not None:
                restore()

    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
                return int(layer.keys.shape[0])
        return 0
