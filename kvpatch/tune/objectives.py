"""What `kvpatch tune` asks of a config: a memory target and a quality floor.

Both are checked on harness results as plain dicts (`EvalResult.to_dict()` rows), so that this
module, and the command line that parses its arguments, import no torch. Memory is what the
harness measured (resident K/V bytes at the end of its decode check), never a formula.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Byte-size suffixes `parse_memory` accepts (decimal and binary).
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class MemoryTarget:
    """Resident K/V as a fraction of the unpatched cache's, or as bytes (exactly one is set)."""

    fraction: float | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.bytes is None):
            raise ValueError("a memory target is a fraction or a byte count, exactly one of them")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"a memory fraction must be in (0, 1], got {self.fraction}")
        if self.bytes is not None and self.bytes < 1:
            raise ValueError(f"a memory byte count must be at least 1, got {self.bytes}")

    def used(self, row: Mapping[str, Any]) -> float:
        """What `row` used, in this target's unit (a fraction or bytes)."""
        return float(row["kv_fraction"] if self.fraction is not None else row["kv_bytes_patched"])

    @property
    def limit(self) -> float:
        return float(self.fraction if self.fraction is not None else self.bytes)  # type: ignore[arg-type]

    def met(self, row: Mapping[str, Any]) -> bool:
        return self.used(row) <= self.limit

    def excess(self, row: Mapping[str, Any]) -> float:
        """How far over the target `row` is, relative to it (0 when met)."""
        return max(0.0, self.used(row) / self.limit - 1.0)

    def describe(self) -> str:
        if self.fraction is not None:
            return f"resident K/V <= {self.fraction:g} of the full cache"
        return f"resident K/V <= {self.bytes:,} bytes"


def parse_memory(text: str) -> MemoryTarget:
    """`0.25` or `25%`: a fraction of the full cache; `3000000`, `3MB`, `2.5MiB`: bytes. A plain
    number up to 1 is a fraction, above 1 a byte count."""
    cleaned = text.strip().lower()
    try:
        if cleaned.endswith("%"):
            return MemoryTarget(fraction=float(cleaned[:-1]) / 100.0)
        match = _SIZE.match(cleaned)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError
        value, unit = float(match.group(1)), match.group(2)
        if unit == "" and value <= 1.0:
            return MemoryTarget(fraction=value)
        return MemoryTarget(bytes=int(value * _UNITS[unit]))
    except ValueError as err:
        detail = f": {err}" if str(err) else ""
        raise ValueError(f"memory target {text!r} is not a fraction (0.25, 25%) or a size "
                         f"(3000000, 3MB, 2.5MiB){detail}") from None


@dataclass(frozen=True)
class Floor:
    """The least quality a chosen config may have; None: that metric is not constrained."""

    max_ppl_ratio: float | None = None
    min_needle: float | None = None
    min_logit_cosine: float | None = None

    def __post_init__(self) -> None:
        if self.max_ppl_ratio is not None and not (self.max_ppl_ratio >= 1.0 and math.isfinite(self.max_ppl_ratio)):
            raise ValueError(f"max_ppl_ratio must be a finite number >= 1.0, got {self.max_ppl_ratio}")
        for name in ("min_needle", "min_logit_cosine"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    def _checks(self, row: Mapping[str, Any]) -> list[tuple[bool, float, str]]:
        """(holds, relative shortfall, message) per constrained metric. NaN never holds."""
        checks = []
        if self.max_ppl_ratio is not None:
            ppl = row["ppl_ratio"]
            checks.append((ppl <= self.max_ppl_ratio, _relative(ppl, self.max_ppl_ratio, above=True),
                           f"ppl ratio {ppl:.4f} > {self.max_ppl_ratio:g}"))
        if self.min_needle is not None:
            needle = row["needle_acc_patched"]
            checks.append((needle >= self.min_needle, _relative(needle, self.min_needle, above=False),
                           f"needle {needle:.2f} < {self.min_needle:g}"))
        if self.min_logit_cosine is not None:
            cosine = row["logit_cosine_min"]
            checks.append((cosine >= self.min_logit_cosine, _relative(cosine, self.min_logit_cosine, above=False),
                           f"logit cosine {cosine:.4f} < {self.min_logit_cosine:g}"))
        return checks

    def violations(self, row: Mapping[str, Any]) -> list[str]:
        return [message for holds, _, message in self._checks(row) if not holds]

    def shortfall(self, row: Mapping[str, Any]) -> float:
        """Sum of the relative amounts by which `row` misses each bound (0 when all hold)."""
        return sum(gap for holds, gap, _ in self._checks(row) if not holds)

    def describe(self) -> str:
        parts = [f"ppl ratio <= {self.max_ppl_ratio:g}" if self.max_ppl_ratio is not None else "",
                 f"needle >= {self.min_needle:g}" if self.min_needle is not None else "",
                 f"logit cosine >= {self.min_logit_cosine:g}" if self.min_logit_cosine is not None else ""]
        return ", ".join(p for p in parts if p) or "none"

    def fidelity(self, lossless: bool) -> dict[str, Any]:
        """The `fidelity:` section of a chosen config: the floor as the bounds it declares (the
        needle floor has no config field; the YAML's header comment states it)."""
        if lossless:
            return {"lossless": True}
        bounds = {"min_logit_cosine": self.min_logit_cosine, "max_ppl_ratio": self.max_ppl_ratio}
        return {"lossless": False, **{k: v for k, v in bounds.items() if v is not None}}

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def _relative(value: float, bound: float, above: bool) -> float:
    """How far `value` is past `bound`, relative to it (inf for NaN)."""
    if value != value:
        return math.inf
    gap = value - bound if above else bound - value
    return max(0.0, gap) / max(abs(bound), 1e-12)
