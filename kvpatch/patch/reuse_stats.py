"""What chunk reuse did for the last prefill: per batch row and summed (`handle.reuse.last`,
`handle.stats()["reuse"]`, `Engine.generate_batch`'s per-prompt results). Counts cover each
row's real tokens: padding never counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclass
class RowStats:
    """What reuse did for one row of the last prefill (its real tokens; padding never counts)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    approximate_tokens: int = 0
    recomputed_tokens: int = 0
    check_tokens: int = 0

    @property
    def kv_reuse_ratio(self) -> float:
        return _ratio(self.reused_tokens, self.prompt_tokens)

    @property
    def approximate_ratio(self) -> float:
        return _ratio(self.approximate_tokens, self.prompt_tokens)


@dataclass
class RequestStats:
    """What reuse did for the last prefill: per batch row (`rows`) and summed over them."""

    rows: list[RowStats] = field(default_factory=list)
    lookup_ms: float = 0.0
    load_ms: float = 0.0
    written_chunks: int = 0

    def _total(self, name: str) -> int:
        return sum(getattr(row, name) for row in self.rows)

    @property
    def prompt_tokens(self) -> int:
        return self._total("prompt_tokens")

    @property
    def reused_tokens(self) -> int:
        return self._total("reused_tokens")

    @property
    def approximate_tokens(self) -> int:
        return self._total("approximate_tokens")

    @property
    def recomputed_tokens(self) -> int:
        return self._total("recomputed_tokens")

    @property
    def check_tokens(self) -> int:
        return self._total("check_tokens")

    @property
    def kv_reuse_ratio(self) -> float:
        return _ratio(self.reused_tokens, self.prompt_tokens)

    @property
    def approximate_ratio(self) -> float:
        return _ratio(self.approximate_tokens, self.prompt_tokens)

    @property
    def row_reuse_ratios(self) -> list[float]:
        return [row.kv_reuse_ratio for row in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """Totals, ratios and per-row figures (what `Engine.stats()` and `handle.stats()` show)."""
        totals = ("prompt_tokens", "reused_tokens", "approximate_tokens", "recomputed_tokens", "check_tokens",
                  "kv_reuse_ratio", "approximate_ratio")
        rows = [{**asdict(row), "kv_reuse_ratio": row.kv_reuse_ratio, "approximate_ratio": row.approximate_ratio}
                for row in self.rows]
        return {**{name: getattr(self, name) for name in totals}, "lookup_ms": self.lookup_ms,
                "load_ms": self.load_ms, "written_chunks": self.written_chunks, "rows": rows}
