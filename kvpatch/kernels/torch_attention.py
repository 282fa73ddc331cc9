"""Attention in plain torch: `sdpa_attention` (fast path) and `math_attention` (reference path).

Both take query `[B, Hq, Tq, D]` and key/value `[B, Hkv, Tk, D]` with `Hq` a multiple of `Hkv`
(grouped-query attention, never expanded in memory), and return `[B, Hq, Tq, D]`. A mask is
boolean (True = attend) or additive float, broadcastable to `[B, 1, Tq, Tk]`; `None` means plain
causal attention aligned bottom-right (the last query sees every key), which is what
transformers means when it skips building a mask.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

#: The SDPA backends kvpatch lets torch choose from. cuDNN attention is left out: it builds a new
#: execution plan for every new key length, i.e. at every decode step; on the H100 (torch 2.11)
#: that was 5.6 ms of CPU per call and made an eager 1B-model decode step ~60 ms at any batch
#: (results/kernels-h100-fib-graph.json, `profile`). Flash handles the same calls. A prefill into
#: an empty cache (plain causal, no mask) is left to torch's own choice, as transformers leaves it:
#: on the H200 torch picks cuDNN's kernel there, 2.61 ms per layer at 16K tokens against flash's
#: 3.73 ms (docs/reuse.md, "A miss, taken apart"), and it builds a plan per prompt, not per step.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def bottom_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean `[Tq, Tk]` mask where query i sees keys up to `k_len - q_len + i`."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """torch's scaled_dot_product_attention with GQA and bottom-right causality handled."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    is_causal = False
    if mask is None and q_len > 1:
        if q_len == k_len:
            is_causal = True
        else:  # a prefill over a cache: flash attention handles bottom-right causality natively
            mask = causal_lower_right(q_len, k_len)
    backends = sdpa_kernel(SDPA_BACKENDS) if not is_causal else contextlib.nullcontext()
    with backends:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention; returns (output, probabilities `[B, Hq, Tq, Tk]`).

    Needed where SDPA cannot go: logit soft-capping (Gemma2), learned attention sinks (gpt-oss:
    one logit per query head `sinks [Hq]` that joins every softmax but has no value, so the
    probabilities over the real keys sum to less than one) and callers that want the attention
    probabilities (importance scorers). Softmax runs in float32, as transformers' eager path does.
    Value heads may be narrower or wider than query/key heads (MLA).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[-2]
    groups = q_heads // kv_heads
    grouped_query = query.view(batch, kv_heads, groups, q_len, head_dim)
    scores = torch.matmul(grouped_query, key.unsqueeze(2).transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None and q_len > 1:
        mask = bottom_right_causal_mask(q_len, k_len, query.device)
    if mask is not None:
        if mask.dim() == 4:
            mask = mask.unsqueeze(2)  # [B, 1, Tq, Tk] -> [B, 1, 1, Tq, Tk] over (kv head, group)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if sinks is not None:
        sink_logits = sinks.to(scores.dtype).view(1, kv_heads, groups, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink_logits], dim=-1), dim=-1, dtype=torch.float32)
        probs = probs[..., :-1].to(query.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value.unsqueeze(2))
    return out.view(batch, q_heads, q_len, value.shape[-1]), probs.view(batch, q_heads, q_len, k_len)
