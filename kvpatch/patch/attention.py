"""kvpatch's attention function, registered with transformers' AttentionInterface.

transformers calls it from every attention module of a supported family after the cache update,
with query `[B, Hq, Tq, D]` and the cache's key/value `[B, Hkv, Tk, D]`; it must return
`([B, Tq, Hq, D], weights-or-None)`. The same name is registered with the AttentionMaskInterface
(sdpa-style boolean masks): without that, transformers hands us no mask at all and padding and
sliding windows are silently lost.

A quantized cache layer may hand over its stored parts undecoded (`PackedKV`, as both key and
value) in decode: the `triton` kernel reads them packed, every other kernel decodes them first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import causal_mask_function, sdpa_mask

from ..compat import mask_query_length
from ..errors import UnsupportedModelError
from ..kernels import math_attention, sdpa_attention
from ..kernels.torch_attention import bottom_right_causal_mask
from ..kernels.packed import PackedKV
from ..kernels.triton_support import log_fallback, triton_unavailable_reason

ATTENTION_NAME = "kvpatch"
#: Attribute set on each patched attention module: which kernel computes its attention.
KERNEL_ATTR = "_kvpatch_kernel"
#: Keywords that change attention math in ways kvpatch does not implement.
_UNSUPPORTED_KWARGS = ("sinks",)


#: Called as fn(module, query, key, value, scaling) on every kvpatch attention call while
#: registered (probes, K/V capture for benchmarks, attention scorers).
AttentionObserver = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float], None]
_observers: list[AttentionObserver] = []


def add_observer(observer: AttentionObserver) -> None:
    _observers.append(observer)


def remove_observer(observer: AttentionObserver) -> None:
    _observers.remove(observer)


@contextmanager
def observe_attention(observer: AttentionObserver) -> Iterator[None]:
    """Call `observer` on every kvpatch attention call inside the block."""
    add_observer(observer)
    try:
        yield
    finally:
        remove_observer(observer)


@contextmanager
def probe_attention_calls() -> Iterator[list[torch.nn.Module]]:
    """Record every module that calls kvpatch's attention inside the block."""
    modules: list[torch.nn.Module] = []
    with observe_attention(lambda module, *_: modules.append(module)):
        yield modules


def kvpatch_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over the (kvpatch-managed) cache; see the module docstring for the contract.

    `s_aux` are gpt-oss's learned attention sinks (one logit per query head): SDPA cannot add
    them, so those calls take the torch math path whatever the kernel (`apply` refuses the fused
    kernel for such a family rather than letting it fall back silently)."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"{type(module).__name__} passes `{name}` to attention, which kvpatch does not implement"
            )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if _observers and isinstance(key, PackedKV):
        key, value = key.dense()
    for observer in _observers:
        observer(module, query, key, value, scaling)
    dropout = dropout if module.training else 0.0
    kernel = "torch" if s_aux is not None else getattr(module, KERNEL_ATTR, "sdpa")
    if kernel == "triton":
        # a static layer's mask spans its whole buffer (a fixed shape for CUDA graphs): kept whole
        static = isinstance(key, PackedKV) and key.counts is not None
        mask = attention_mask if static or attention_mask is None else attention_mask[..., : key.shape[-2]]
        out = _triton_attention(query, key, value, mask, scaling, dropout, softcap)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
        if static and query.is_cuda and torch.cuda.is_current_stream_capturing():
            # the torch kernels read a static layer's valid length on the host: a graph would freeze it
            raise RuntimeError("the fused kernel cannot run this decode step (see the logged reason), "
                               "and a CUDA-graph step cannot fall back to the torch kernels")
        kernel = "sdpa"
    if isinstance(key, PackedKV):
        key, value = key.dense()
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    if kernel == "sdpa" and softcap is None:
        out = sdpa_attention(query, key, value, attention_mask, scaling, dropout)
        weights = None
    else:
        out, weights = math_attention(query, key, value, attention_mask, scaling, dropout, softcap, s_aux)
    return out.transpose(1, 2).contiguous(), weights


@torch.compiler.disable  # reads host-side layer state; opaque to dynamo, so a compiled decoder never guards on it
def _triton_attention(query: torch.Tensor, key: torch.Tensor | PackedKV, value: torch.Tensor | PackedKV,
                      mask: torch.Tensor | None, scaling: float, dropout: float,
                      softcap: float | None) -> torch.Tensor | None:
    """The fused decode kernel's output, or None where the torch kernels must run: prefill (by
    design, SDPA over decoded K/V) and anything the kernel does not do (the reason is logged)."""
    kv = key if isinstance(key, PackedKV) else PackedKV(key, value)  # type: ignore[arg-type]
    reason = triton_unavailable_reason(query)
    if reason is None and softcap is not None:
        reason = "logit soft-capping is not implemented in the fused kernel"
    if reason is None and dropout > 0.0:
        reason = "attention dropout is not implemented in the fused kernel"
    if reason is None:
        from ..kernels import (
            triton_decode,  # imports triton: only once it is known to run
        )

        if query.shape[1] // kv.keys.shape[1] * query.shape[2] > triton_decode.MAX_QUERY_ROWS:
            return None
        reason = triton_decode.unsupported_reason(query, kv, mask)
        if reason is None:
            out = triton_decode.decode_attention(query, kv, scaling, mask)
            if kv.layer is not None:
                kv.layer.use_triton_encode()
            return out
    log_fallback(reason)
    return None


def kvpatch_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask, except that a plain bottom-right causal mask (a prefill over a
    cache, without padding or windows) becomes None: the attention function then uses the
    flash kernel's own lower-right causality instead of a materialised mask, which SDPA can only
    serve with slower kernels. Replaced only after checking it equals that pattern exactly."""
    if _captured_without_mask(kwargs):
        return None
    mask = sdpa_mask(*args, **kwargs)
    if mask is None:
        if not _skipped_mask_is_top_left(kwargs):
            return None
        # transformers skipped a mask that SDPA's `is_causal` would align top-left (a prefill into
        # an empty static buffer); kvpatch reads None as bottom-right, so build it explicitly.
        mask = sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4:
        return mask
    q_len, k_len = mask.shape[-2], mask.shape[-1]
    if q_len <= 1 or q_len >= k_len:
        return mask
    causal = bottom_right_causal_mask(q_len, k_len, mask.device)
    return None if torch.equal(mask, causal.expand_as(mask)) else mask


def _captured_without_mask(mask_kwargs: dict[str, Any]) -> bool:
    """Whether a CUDA graph is capturing a one-query decode step with no padding mask
    (kvpatch.CudaGraphDecoder): the query sees every stored key up to the layer's device-side
    count, so no mask is needed, and building one would freeze the step's host-side offsets into
    the graph. (DecodeGraphs passes its own 4D mask, which transformers does not rebuild.)"""
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return False
    return (mask_kwargs.get("attention_mask") is None and mask_query_length(mask_kwargs) == 1
            and mask_kwargs.get("kv_offset", 0) == 0 and mask_kwargs.get("local_size") is None
            and mask_kwargs.get("mask_function", causal_mask_function) is causal_mask_function)


def _skipped_mask_is_top_left(mask_kwargs: dict[str, Any]) -> bool:
    """Whether transformers skipped the mask for more queries than keys-minus-queries allows
    bottom-right alignment to agree with top-left (`q > 1` and `kv > q`)."""
    q_len = mask_query_length(mask_kwargs)
    kv_len = mask_kwargs.get("kv_length")
    return q_len is not None and kv_len is not None and 1 < q_len < int(kv_len)


def register_attention() -> None:
    """Register the attention and mask functions under ATTENTION_NAME (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvpatch_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, kvpatch_mask)
