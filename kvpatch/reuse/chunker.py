"""Where a prompt is cut into chunks: fixed size, optionally moved to a natural boundary.

A cut depends only on the tokens up to `cut + boundary_window`, so two prompts that share a
prefix cut it identically (up to the last `size + window` tokens of the shorter one) and their
chunks hash alike. Segment starts (separately supplied texts, e.g. RAG documents) always start
a new chunk: that is what lets a document cached on its own be found again inside another prompt.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

Span = tuple[int, int]


def chunk_spans(
    token_ids: Sequence[int],
    size: int,
    boundary_window: int = 0,
    boundary_tokens: Container[int] = (),
    segment_starts: Sequence[int] = (),
) -> list[Span]:
    """Half-open `[start, end)` spans covering `token_ids`; the last one may be a shorter tail.

    With `boundary_window` W > 0, a cut at `start + size` moves to the nearest position within
    +/-W whose previous token is in `boundary_tokens` (e.g. a newline), if any.
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    n = len(token_ids)
    forced = sorted({s for s in segment_starts if 0 < s < n})
    spans: list[Span] = []
    start = 0
    while start < n:
        limit = next((s for s in forced if s > start), n)
        cut = start + size
        if cut >= limit:
            cut = limit
        elif boundary_window > 0:
            cut = _nearest_boundary(token_ids, cut, start + 1, limit, boundary_window, boundary_tokens)
        spans.append((start, cut))
        start = cut
    return spans


def _nearest_boundary(token_ids: Sequence[int], target: int, low: int, high: int, window: int,
                      boundary_tokens: Container[int]) -> int:
    """The cut in `[target-window, target+window]` ∩ `[low, high]` right after a boundary token
    nearest to `target` (earlier wins a tie), else `target`."""
    for offset in range(window + 1):
        for cut in (target - offset, target + offset):
            if low <= cut <= high and cut < len(token_ids) + 1 and token_ids[cut - 1] in boundary_tokens:
                return cut
    return target
