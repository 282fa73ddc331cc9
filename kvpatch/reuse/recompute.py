"""Recomputing chosen tokens of an assembled cache in place: the mechanism behind seam repair,
CacheBlend, and filling chunks missing between reused ones.

`recompute_positions` runs the decoder on the tokens at `positions` only, with the real
positions, attending (causally, by position) over the whole assembled K/V; each layer writes
the fresh K/V of those tokens over the stale ones before attending, so a recomputed token sees
the fresh K/V of every recomputed token before it. Tokens that are not recomputed keep their
(reused) K/V. With every non-exact token recomputed the result is exactly a full prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..compat import cache_kwarg, query_length
from ..cache import LayerLayout, layer_layouts

#: Called with (layer index, positions, fresh keys, fresh values, stale keys, stale values)
#: before a layer's K/V are overwritten (CacheBlend measures deviation here).
WriteObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class ScatterLayer(CacheLayerMixin):
    """A cache layer over a fixed `[B, H, M, D]` K/V whose `update` writes at `positions`."""

    is_sliding = False

    def __init__(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 observer: WriteObserver | None) -> None:
        super().__init__()
        self.layer_idx, self.keys, self.values = layer_idx, keys, values
        self.positions, self.observer = positions, observer
        self.is_initialized = True
        self.device, self.dtype = keys.device, keys.dtype

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        """Never needed: the layer is created full."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.observer is not None:
            self.observer(self.layer_idx, self.positions, key_states, value_states,
                          self.keys[:, :, self.positions], self.values[:, :, self.positions])
        self.keys[:, :, self.positions] = key_states
        self.values[:, :, self.positions] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.keys.shape[-2])

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query: Any, *args: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length(query), 0


class _StopForward(Exception):
    """Raised after the last layer a partial forward needs."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers (`layers` on Llama-likes, `h` on GPT-2), found by length."""
    count = model.config.get_text_config(decoder=True).num_hidden_layers
    for child in model.base_model.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == count:
            return child
    raise TypeError(f"{type(model).__name__}: no ModuleList of {count} decoder layers under base_model")


def visibility_masks(model: torch.nn.Module, positions: torch.Tensor, total: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """Boolean `[1, 1, len(positions), total]` masks: a query at position p sees keys at <= p (and
    > p - window on sliding layers). A dict by layer type when the model mixes layer types."""
    keys = torch.arange(total, device=positions.device)
    causal = keys[None, :] <= positions[:, None]

    def masked(layout: LayerLayout) -> torch.Tensor:
        mask = causal
        if layout.sliding_window is not None:
            mask = mask & (keys[None, :] > positions[:, None] - layout.sliding_window)
        return mask[None, None]

    layouts = layer_layouts(model.config)
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return masked(layouts[0])
    by_type: dict[str, torch.Tensor] = {}
    for kind, layout in zip(layer_types, layouts):
        by_type.setdefault(kind, masked(layout))
    return by_type


def recompute_positions(model: torch.nn.Module, input_ids: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                        positions: torch.Tensor, last_layer: int | None = None,
                        observer: WriteObserver | None = None) -> None:
    """Recompute the tokens at sorted `positions` of `input_ids` ([B, M]) in place in `kv` (one
    `[B, H, M, D]` pair per layer), through layer `last_layer` (default: all layers)."""
    if positions.numel() == 0:
        return
    total = input_ids.shape[1]
    cache = Cache(layers=[ScatterLayer(i, k, v, positions, observer) for i, (k, v) in enumerate(kv)])
    batch = input_ids.shape[0]
    kwargs = {
        "input_ids": input_ids[:, positions],
        "position_ids": positions[None].expand(batch, -1),
        "attention_mask": visibility_masks(model, positions, total),
        cache_kwarg(model.base_model): cache,
        "use_cache": True,
    }
    layers = decoder_layers(model)
    hook = None
    if last_layer is not None and last_layer < len(layers) - 1:
        def stop(*_: Any) -> None:
            raise _StopForward

        hook = layers[last_layer].register_forward_hook(stop)
    try:
        with torch.no_grad():
            model.base_model(**kwargs)
    except _StopForward:
        pass
    finally:
        if hook is not None:
            hook.remove()


def most_deviated(model: torch.nn.Module, input_ids: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                  candidates: torch.Tensor, recompute: torch.Tensor, check_layer: int, ratio: float) -> torch.Tensor:
    """CacheBlend's selection: recompute `recompute` (all non-exact tokens) through
    `check_layer`, then return the `ratio` fraction of `candidates` (reused tokens) whose K/V
    moved most there (relative L2 over heads and channels)."""
    deviation: dict[str, torch.Tensor] = {}

    def measure(layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                old_k: torch.Tensor, old_v: torch.Tensor) -> None:
        if layer == check_layer:
            diff = (k - old_k).float().pow(2).sum(dim=(1, 3)) + (v - old_v).float().pow(2).sum(dim=(1, 3))
            norm = old_k.float().pow(2).sum(dim=(1, 3)) + old_v.float().pow(2).sum(dim=(1, 3))
            deviation["score"] = (diff / norm.clamp_min(1e-12)).sum(dim=0)  # [len(positions)]

    recompute_positions(model, input_ids, kv, recompute, last_layer=check_layer, observer=measure)
    count = round(ratio * candidates.numel())
    if count == 0 or "score" not in deviation:
        return candidates[:0]
    scores = deviation["score"][torch.searchsorted(recompute, candidates)]  # `recompute` is sorted
    return candidates[scores.topk(count).indices].sort().values
