"""What chunk reuse did for the last prefill: per batch row and summed (`handle.reuse.last`,
`handle.stats()["reuse"]`, `Engine.generate_batch`'s per-prompt results). Counts cover each
row's real tokens: padding never counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


#: The token counts of a row, and of a request (summed over its rows).
COUNTS = ("prompt_tokens", "reused_tokens", "approximate_tokens", "recomputed_tokens", "check_tokens")


class _ReuseRatios:
    """The ratios a row and a request both report, from their token counts."""

    prompt_tokens: int
    reused_tokens: int
    approximate_tokens: int

    @property
    def kv_reuse_ratio(self) -> float:
        return _ratio(self.reused_tokens, self.prompt_tokens)

    @property
    def approximate_ratio(self) -> float:
        return _ratio(self.approximate_tokens, self.prompt_tokens)

    def ratios(self) -> dict[str, float]:
        return {"kv_reuse_ratio": self.kv_reuse_ratio, "approximate_ratio": self.approximate_ratio}


@dataclass
class RowStats(_ReuseRatios):
    """What reuse did for one row of the last prefill (its real tokens; padding never counts)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    approximate_tokens: int = 0
    recomputed_tokens: int = 0
    check_tokens: int = 0


def _summed(name: str) -> property:
    return property(lambda self: sum(getattr(row, name) for row in self.rows), doc=f"{name}, summed over the rows")


@dataclass
class RequestStats(_ReuseRatios):
    """What reuse did for the last prefill: per batch row (`rows`) and summed over them."""

    rows: list[RowStats] = field(default_factory=list)
    lookup_ms: float = 0.0
    load_ms: float = 0.0
    written_chunks: int = 0

    prompt_tokens = _summed("prompt_tokens")  # type: ignore[assignment]
    reused_tokens = _summed("reused_tokens")  # type: ignore[assignment]
    approximate_tokens = _summed("approximate_tokens")  # type: ignore[assignment]
    recomputed_tokens = _summed("recomputed_tokens")
    check_tokens = _summed("check_tokens")

    @property
    def row_reuse_ratios(self) -> list[float]:
        return [row.kv_reuse_ratio for row in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """Totals, ratios and per-row figures (what `Engine.stats()` and `handle.stats()` show)."""
        rows = [{**asdict(row), **row.ratios()} for row in self.rows]
        return {**{name: getattr(self, name) for name in COUNTS}, **self.ratios(), "lookup_ms": self.lookup_ms,
                "load_ms": self.load_ms, "written_chunks": self.written_chunks, "rows": rows}
