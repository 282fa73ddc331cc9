"""Per-forward events for cache layers that act on attention (scoring, eviction).

Layers that define `observe_attention(query, key, value, scaling)` get each of their attention
calls (routed by the attention module's `layer_idx`) with the exact K/V tensors attention reads
next (a tiered layer may swap promoted tokens into them in place), and layers that define
`after_forward()` are told when the model's forward has finished, which is when an evicting
layer may drop tokens (transformers' eviction contract: return everything from `update`, evict
after).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .attention import add_observer, remove_observer
from ..cache import KVPatchCache


class PaddedBatchError(UnsupportedModelError):
    """Raised for padded batches under a config that evicts tokens."""


class CacheEvents:
    """Installed by `apply` when the pipeline's layers need attention events; `remove()` undoes it."""

    def __init__(self, model: torch.nn.Module, modules: list[torch.nn.Module], cache_kwarg: str,
                 active_cache: Callable[[], KVPatchCache | None], config_name: str = "?") -> None:
        self._modules = {id(m) for m in modules}
        self._config_name = config_name
        self._active_cache = active_cache
        self._cache_kwarg = cache_kwarg
        add_observer(self._observe)
        self._hooks = [
            model.register_forward_pre_hook(self._refuse_padding, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]

    def _observe(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        cache = self._active_cache()
        if cache is None or id(module) not in self._modules:
            return
        observe = getattr(cache.layers[module.layer_idx], "observe_attention", None)
        if observe is not None:
            observe(query, key, value, scaling)

    def _refuse_padding(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise PaddedBatchError(
                f"kvpatch: config {self._config_name!r} evicts tokens, which does not support padded "
                "batches (the padding mask is indexed by positions that eviction removes, and padding "
                "would count against each row's budget); run one sequence per call or batch prompts of "
                "equal length (configs without eviction, chunk reuse included, take left-padded batches)"
            )

    def _after_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        cache = self._active_cache()
        if cache is None:
            return
        for layer in cache.layers:
            after = getattr(layer, "after_forward", None)
            if after is not None:
                after()

    def remove(self) -> None:
        remove_observer(self._observe)
        for hook in self._hooks:
            hook.remove()
