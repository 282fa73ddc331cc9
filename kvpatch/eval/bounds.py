"""What "lossless" allows, derived from the noise floor of the run itself.

Two correct implementations of the same model disagree by rounding, and how much depends on
the dtype and the kernels: in float32 the disagreement is ~1e-12 (1 - cosine), in bfloat16
on a GPU it is ~1e-4 (attention-output cosine) and ~1e-3 (perplexity). So fixed float32 thresholds call a
lossless config VIOLATED in bf16. The harness instead measures the floor in the same run: the
unpatched model with another attention backend (eager vs sdpa), scored against the unpatched
reference with the same metrics. A lossless config may deviate from the reference by at most
`FLOOR_MARGIN` times the floor, and never less than the float32 allowance `EXACT`:

    allowed[m] = max(EXACT[m], FLOOR_MARGIN * floor[m])      for every metric m

In float32 the floor is ~0, so the rule is the exact one (EXACT); in bf16 it widens by what the
dtype itself costs, and an error larger than that (a perturbed cache, a quantizer) still fails.
See docs/fidelity.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Deviation:
    """Distances of one run from the reference, each 0 when identical."""

    logit: float  # 1 - worst-step logit cosine
    attention: float | None  # 1 - worst attention-output cosine (None: not captured)
    ppl: float  # |perplexity ratio - 1|
    top1: float  # 1 - top-1 agreement

    @classmethod
    def of(cls, logit_cosine_min: float, attn_cosine_min: float | None, ppl_ratio: float,
           top1_agreement: float) -> "Deviation":
        return cls(1.0 - logit_cosine_min, None if attn_cosine_min is None else 1.0 - attn_cosine_min,
                   abs(ppl_ratio - 1.0), 1.0 - top1_agreement)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Deviation":
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


#: The allowance when the floor is ~0 (float32): kernels may reorder sums, nothing more. A
#: cosine deviation is about half the squared relative error, so 1e-8 allows a relative error of
#: ~1.4e-4 (float32 reordering is ~1e-6) and flags a 1e-3 one (tools/eval_sensitivity.py).
EXACT = Deviation(logit=1e-8, attention=1e-8, ppl=1e-5, top1=0.0)
#: How far above the measured floor a lossless config may go. Two unrelated correct backends
#: differ by about the floor; a lossless kvpatch config is one more such backend, so it lands
#: near the floor too, while real K/V errors land orders of magnitude above it.
FLOOR_MARGIN = 4.0


def lossless_allowance(floor: Deviation) -> Deviation:
    """The per-metric allowance of a lossless config, given the run's noise floor."""

    def allowed(exact: float, measured: float | None) -> float:
        return exact if measured is None or measured != measured else max(exact, FLOOR_MARGIN * measured)

    return Deviation(
        logit=allowed(EXACT.logit, floor.logit),
        attention=allowed(EXACT.attention or 0.0, floor.attention),
        ppl=allowed(EXACT.ppl, floor.ppl),
        top1=allowed(EXACT.top1, floor.top1),
    )


def lossless_violations(deviation: Deviation, allowance: Deviation) -> list[str]:
    """Readable violations of `allowance` (NaN deviations violate: NaN compares False)."""
    checks = [
        ("logit cosine", deviation.logit, allowance.logit),
        ("attention-output cosine", deviation.attention, allowance.attention),
        ("ppl ratio", deviation.ppl, allowance.ppl),
        ("top1 agreement", deviation.top1, allowance.top1),
    ]
    return [
        f"lossless: {name} deviates by {dev:.3g} from the unpatched model, more than the allowed {allowed:.3g} "
        f"(max of the float32 allowance and {FLOOR_MARGIN:g}x the noise floor)"
        for name, dev, allowed in checks
        if dev is not None and allowed is not None and not dev <= allowed
    ]
