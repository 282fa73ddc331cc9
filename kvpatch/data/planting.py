"""Plant several text snippets into filler at chosen depths, at an exact token length.

The multi-snippet generalisation of the needle row (`needle.make_needle_example` plants one): the
long-context tasks (`tasks.py`) put several definitions into one row, each on a line of its own
at its own relative depth, and end the row with a query. Built at the token level so that every
row has exactly `context_tokens` ids and rows of one length batch without padding.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .needle import _bos, _filler_window, _snap_to_line_end, encode, newline_ids


@dataclass(frozen=True)
class PlantedRow:
    """`input_ids` (exactly the requested length, ending with the query) and where each
    snippet's first token landed, in the order the snippets were given."""

    input_ids: list[int]
    positions: tuple[int, ...]
    query_length: int


def plant(
    tokenizer: Any,
    filler_ids: Sequence[int],
    context_tokens: int,
    snippets: Sequence[str],
    depths: Sequence[float],
    query: str,
    rng: random.Random,
) -> PlantedRow:
    """A row of exactly `context_tokens` ids: <bos>, filler with `snippets[i]` at `depths[i]` of
    the filler, then `query`. Each snippet should open its own line ("\\n..."); it is moved by up
    to a few tokens to a line end of the filler so that the filler's newline closes it, or gets a
    newline of its own when no line end is near (the filler is shortened to keep the length)."""
    if len(snippets) != len(depths) or not snippets:
        raise ValueError(f"need one depth per snippet, got {len(snippets)} snippets and {len(depths)} depths")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
    bos, query_ids = _bos(tokenizer), encode(tokenizer, query)
    pieces = [encode(tokenizer, s) for s in snippets]
    n_filler = context_tokens - len(bos) - sum(map(len, pieces)) - len(query_ids)
    if n_filler < 4 * len(snippets):
        raise ValueError(f"context_tokens={context_tokens} is too short for {len(snippets)} snippets and a query")
    window = _filler_window(filler_ids, n_filler, rng)
    newlines = newline_ids(tokenizer)
    cuts: list[int] = []
    for i, depth in enumerate(depths):
        target = round(depth * n_filler)
        cut = _snap_to_line_end(window, target, newlines)
        if cut is None:  # no line end nearby: the snippet closes its own line, at the exact depth
            pieces[i], cut = encode(tokenizer, snippets[i] + "\n"), target
        cuts.append(cut)
    extra = sum(map(len, pieces)) - (context_tokens - len(bos) - len(query_ids) - n_filler)
    window = window[: n_filler - extra]
    cuts = [min(c, len(window)) for c in cuts]
    order = sorted(range(len(pieces)), key=lambda i: (cuts[i], i))
    ids, positions, last = list(bos), [0] * len(pieces), 0
    for i in order:
        ids += window[last : cuts[i]]
        positions[i], last = len(ids), cuts[i]
        ids += pieces[i]
    ids += window[last:] + query_ids
    return PlantedRow(ids, tuple(positions), len(query_ids))
