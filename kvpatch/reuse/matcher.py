"""Which chunks of a prompt can be reused, and how exactly.

Exact: the chunk's prefix hash is stored, so its K/V were computed over the same tokens at the
same positions: reusing them is lossless provided every chunk before it is exact too (a missing
chunk in between is recomputed against the real history, which restores exactness).
Approximate: only the content hash is stored: the same tokens, computed at another position or
after other text. Usable after re-rotation and repair (see `recompute`), never lossless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .chunk import ChunkStore, StoredChunk
from .chunker import Span

MatchKind = Literal["exact", "approximate", "miss"]


@dataclass
class ChunkMatch:
    span: Span
    prefix_hash: str
    content_hash: str
    kind: MatchKind
    chunk: StoredChunk | None = None

    @property
    def num_tokens(self) -> int:
        return self.span[1] - self.span[0]


@dataclass
class MatchPlan:
    """Per-chunk matches of one prompt row, in prompt order."""

    matches: list[ChunkMatch]

    def leading_exact_tokens(self) -> int:
        """Tokens covered by the unbroken run of exact matches from the start."""
        end = 0
        for m in self.matches:
            if m.kind != "exact":
                break
            end = m.span[1]
        return end

    def last_reused_end(self) -> int:
        """End of the last exact or approximate chunk (0 when nothing matched)."""
        return max((m.span[1] for m in self.matches if m.kind != "miss"), default=0)

    def tokens_of(self, kind: MatchKind) -> int:
        return sum(m.num_tokens for m in self.matches if m.kind == kind)

    @property
    def is_plain_prefix(self) -> bool:
        """Nothing reusable beyond the leading exact run (the common, cheapest case)."""
        return self.last_reused_end() == self.leading_exact_tokens()


def match_chunks(spans: Sequence[Span], prefix_hashes: Sequence[str], content_hashes: Sequence[str],
                 store: ChunkStore, approximate: bool) -> MatchPlan:
    """Exact matches by prefix hash first; then, for the remaining chunks, content-hash matches
    when `approximate` is on. Stores count the hits and misses."""
    matches = []
    for span, prefix, content in zip(spans, prefix_hashes, content_hashes):
        chunk = store.get(prefix)
        if chunk is not None and chunk.num_tokens == span[1] - span[0]:
            matches.append(ChunkMatch(span, prefix, content, "exact", chunk))
            continue
        chunk = store.get_by_content(content) if approximate else None
        if chunk is not None and chunk.num_tokens == span[1] - span[0]:
            matches.append(ChunkMatch(span, prefix, content, "approximate", chunk))
        else:
            matches.append(ChunkMatch(span, prefix, content, "miss"))
    return MatchPlan(matches)
