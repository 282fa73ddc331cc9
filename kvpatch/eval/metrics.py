"""Numeric building blocks of the fidelity harness, each usable on its own.

Kept free of any patching logic: every function takes tensors or a model and returns numbers,
so the harness can run the same code on the unpatched and the patched model and compare.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..compat import cache_kwarg, output_cache


def window_spans(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, n_scored) of each sliding window over `n_tokens` ids.

    Windows advance by `stride`; only the last `n_scored` targets of a window are scored, so
    with `stride < window` every token after the first is predicted exactly once and (after the
    first window) with at least `window - stride` tokens of context. `stride == window` is the
    non-overlapping protocol of `kvpatch.models.perplexity`: each window's first token has no
    context and goes unscored.
    """
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window}, stride={stride}")
    scored_until = 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        n_scored = end - max(scored_until, begin + 1)
        if n_scored > 0:
            yield begin, end, n_scored
            scored_until = end
        if end == n_tokens:
            return


def window_batches(n_tokens: int, window: int, stride: int, batch_rows: int) -> list[tuple[list[int], int, int]]:
    """The windows of `window_spans` as batches of equal shape: (begins, length, n_scored) each,
    at most `batch_rows` windows per batch, so a batch needs neither padding nor a mask (only
    the first and the last window differ from the rest)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for begin, end, n_scored in window_spans(n_tokens, window, stride):
        groups.setdefault((end - begin, n_scored), []).append(begin)
    return [
        (begins[i : i + batch_rows], length, n_scored)
        for (length, n_scored), begins in groups.items()
        for i in range(0, len(begins), max(1, batch_rows))
    ]


@torch.no_grad()
def sliding_window_nll(
    model: Any,
    ids: torch.Tensor,
    window: int,
    stride: int,
    on_windows: Callable[[int], None] | None = None,
    chunk: int | None = None,
    batch_rows: int = 1,
) -> tuple[float, int]:
    """Summed next-token NLL and number of scored tokens over sliding windows of a 1-D id stream.

    Windows of one shape go through the model `batch_rows` at a time (the same numbers as one by
    one, up to float reordering). With `chunk=None` each batch is one forward. With `chunk=C`,
    each window's unscored context is prefilled and its scored tokens are fed through the cache
    C at a time (chunked prefill): then every scored token is predicted from the cache as the
    storage stage keeps it (quantized, evicted), which a single forward would hide, since a
    prefill attends to its own tokens in full precision. `on_windows(n)` reports progress.
    """
    device = next(model.parameters()).device
    ids = ids.flatten().to(device)
    total_nll, total_count = 0.0, 0
    for begins, length, n_scored in window_batches(ids.numel(), window, stride, batch_rows):
        rows = torch.stack([ids[b : b + length] for b in begins])
        if chunk is None:
            logits = model(input_ids=rows, use_cache=True).logits[:, -n_scored - 1 : -1].float()
        else:
            logits = _chunked_logits(model, rows, length - n_scored, chunk)
        targets = rows[:, -n_scored:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_count += targets.numel()
        if on_windows is not None:
            on_windows(len(begins))
    return total_nll, total_count


def last_logits_only(model: Any) -> dict[str, int]:
    """Keyword that makes a forward compute the last position's logits only (`logits_to_keep`),
    where the model takes it: a long prefill then skips a [B, T, vocab] tensor it never uses."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _chunked_logits(model: Any, rows: torch.Tensor, context: int, chunk: int) -> torch.Tensor:
    """Logits [B, n, vocab] predicting `rows[:, context:]`: prefill `[:, :context]`, then feed the
    rest (all but the last id) through the cache `chunk` ids at a time."""
    kwarg = cache_kwarg(model)
    out = model(input_ids=rows[:, :context], use_cache=True, **last_logits_only(model))
    logits = [out.logits[:, -1:].float()]
    for start in range(context, rows.shape[1] - 1, chunk):
        stop = min(start + chunk, rows.shape[1] - 1)
        out = model(input_ids=rows[:, start:stop], use_cache=True, **{kwarg: output_cache(out)})
        logits.append(out.logits.float())
    return torch.cat(logits, dim=1)


def perplexity_from_nll(total_nll: float, count: int) -> float:
    if count == 0:
        raise ValueError("no tokens were scored")
    return math.exp(total_nll / count)


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per leading row, in float64 so near-1 values are not rounding noise.

    Two all-zero rows count as identical (1.0) rather than NaN.
    """
    a64 = a.reshape(a.shape[0], -1).double()
    b64 = b.reshape(b.shape[0], -1).double()
    cos = torch.nn.functional.cosine_similarity(a64, b64, dim=-1, eps=1e-300)
    both_zero = (a64.abs().amax(dim=-1) == 0) & (b64.abs().amax(dim=-1) == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def logit_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step logit cosine and top-1 match of two [steps, vocab] logit tensors."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    cosine = row_cosine(reference, candidate)
    top1 = reference.argmax(dim=-1) == candidate.argmax(dim=-1)
    return cosine, top1
