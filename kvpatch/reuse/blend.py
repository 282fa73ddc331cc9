"""Assembling one prompt row from chunks reused out of prefix order, and repairing them.

Exact chunks after a missing one, and approximate chunks (same tokens, other position or
history), cannot simply be prepended: the row's K/V are laid out in prompt order (approximate
chunks re-rotated to their new positions, missing chunks as placeholders), then the positions the
repair policy names are recomputed in place (`recompute.py`). Missing tokens and sink tokens are
always recomputed; approximate chunks get `none`, `selective` (their first `seam_tokens`) or
`cacheblend` (the `ratio` most deviated at `check_layer`), plus any positions the recompute
stage picks itself (`RepairPolicy.extra`: a plug-in's own repair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .codecs import dense_kv, kv_shape
from .matcher import MatchPlan
from .recompute import most_deviated, recompute_positions
from .rope import KeyRotator

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class RepairPolicy:
    """How approximate chunks are repaired (`strategy`: none | selective | cacheblend)."""

    strategy: str = "none"
    seam_tokens: int = 0
    sink_tokens: int = 0
    ratio: float = 0.15
    check_layer: int = 1
    #: extra(spans, until): more positions to recompute in every layer, given the approximate
    #: chunks' spans (cut at `until`); a recompute stage's `recompute_positions`.
    extra: Callable[[list[tuple[int, int]], int], torch.Tensor] | None = None


@dataclass
class Blend:
    """A row's assembled K/V for positions `[0, until)` and what it took."""

    layers: KVLayers  # per layer ([1, H, until, D], [1, H, until, D])
    until: int
    reused_tokens: int
    approximate_tokens: int
    recomputed_tokens: int
    check_tokens: int
    #: Start of the first approximate chunk (None: every token is exact).
    first_approximate: int | None


def blend(model: torch.nn.Module, plan: MatchPlan, input_ids: torch.Tensor, rotator: KeyRotator | None,
          policy: RepairPolicy, until: int | None = None) -> Blend:
    """Lay out and repair one row (`input_ids` is `[1, L]`); covers up to the last reused chunk,
    leaving at least the last token to the forward, or only its first `until` tokens (a padded
    batch computes the rest of a row with the other rows' suffixes)."""
    until = min(plan.last_reused_end(), input_ids.shape[1] - 1, input_ids.shape[1] if until is None else until)
    device, dtype = input_ids.device, model.dtype
    reference = next(m.chunk for m in plan.matches if m.chunk is not None)
    layer_count, heads, _, dim = kv_shape(reference)
    parts, missing, approximate, seams, spans = [], [], [], [], []
    for match in plan.matches:
        start, end = match.span[0], min(match.span[1], until)
        if start >= until:
            break
        if match.kind == "miss":
            parts.append(torch.zeros(layer_count, 2, heads, end - start, dim, device=device, dtype=dtype))
            missing.append(torch.arange(start, end))
            continue
        kv = dense_kv(match.chunk, device, dtype)[..., : end - start, :]
        if match.kind == "approximate":
            kv = rotator.rotate(kv, start - match.chunk.start)
            approximate.append(torch.arange(start, end))
            seams.append(start)
            spans.append((start, end))
        parts.append(kv)
    kv = torch.cat(parts, dim=3).unsqueeze(2)  # [L, 2, 1, H, until, D]
    layers = [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]
    ids = input_ids[:, :until]
    recompute = _always_recomputed(missing, seams, spans, plan.leading_exact_tokens(), until, policy)
    candidates = torch.cat(approximate) if approximate else torch.zeros(0, dtype=torch.long)
    check_tokens = 0
    if policy.strategy == "cacheblend" and candidates.numel():
        everything = torch.cat([recompute, candidates]).unique().sort().values.to(device)
        chosen = most_deviated(model, ids, layers, candidates.to(device), everything,
                               min(policy.check_layer, len(layers) - 1), policy.ratio)
        check_tokens = int(everything.numel())
        recompute = torch.cat([recompute.to(device), chosen]).unique().sort().values
    recompute = recompute.to(device)
    recompute_positions(model, ids, layers, recompute)
    return Blend(layers, until, reused_tokens=until - sum(len(m) for m in missing),
                 approximate_tokens=int(candidates.numel()), recomputed_tokens=int(recompute.numel()),
                 check_tokens=check_tokens, first_approximate=min(seams) if seams else None)


def _always_recomputed(missing: list[torch.Tensor], seams: list[int], spans: list[tuple[int, int]],
                       exact_end: int, until: int, policy: RepairPolicy) -> torch.Tensor:
    """Positions recomputed in every layer: missing tokens, sinks past the exact prefix,
    (selective) the first `seam_tokens` of each approximate chunk, and the policy's `extra`."""
    chosen = list(missing)
    if policy.sink_tokens > exact_end:
        chosen.append(torch.arange(exact_end, min(policy.sink_tokens, until)))
    if policy.strategy == "selective":
        chosen.extend(torch.arange(s, min(s + policy.seam_tokens, until)) for s in seams)
    if policy.extra is not None and spans:
        extra = torch.as_tensor(policy.extra(spans, until), dtype=torch.long).flatten().cpu()
        chosen.append(extra[(extra >= 0) & (extra < until)])
    if not chosen:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(chosen).unique().sort().values
