"""`evictor/budget`: keep a fixed token budget per layer, dropping the lowest-scored tokens.

The layer follows transformers' eviction contract (see shared notes): `get_seq_length()` reports
every token seen (RoPE positions stay right), `get_mask_sizes(q)` returns `(kept + q, seen - kept)`,
and `update` returns the full pre-eviction K/V; eviction happens after the forward, once the
scorer has seen this forward's attention (`after_forward`, called by the patch layer).

Selection is per KV head (`granularity: head`: every head keeps its own tokens, same count) or
shared by the heads of a layer (`layer`). Sink tokens and a recent window are always kept.
Sliding-window layers are left as they are (bounded already). Padded batches are refused by the
patch layer: a 2-D padding mask is indexed by positions that eviction has removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..compat import init_empty_layer, query_length
from ..cache import LayerLayout
from ..registry import Stage, first_stage_of, register_stage
from ..stage_specs.evictor import BudgetParams, budget_tokens
from .offloader import CpuOffloader
from .scorers import ScoreContext, ScorerStage


def protected_tokens(positions: torch.Tensor, seen: int, sink_tokens: int, recent: int) -> torch.Tensor:
    """Tokens that never leave a layer's full-precision set: the sinks and the recent window."""
    return (positions < sink_tokens) | (positions >= seen - recent)


class EvictingLayer(DynamicLayer):
    """Dense K/V of the kept tokens, their positions and scores."""

    def __init__(self, evictor: "BudgetEvictor", scorer: ScorerStage, offloader: CpuOffloader | None = None) -> None:
        super().__init__()
        self.evictor, self.scorer, self.offloader = evictor, scorer, offloader
        #: Evicted tokens kept in host memory when the config has an offloader: chunks of
        #: (keys, values, positions), each [B, Hkv, n, ...]; `restore()` brings them back.
        self.offloaded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.seen = 0
        self.positions: torch.Tensor | None = None  # [B, Hkv, kept] long
        self.scores: torch.Tensor | None = None  # [B, Hkv, kept] float32, aligned with keys
        self.forwards_since_eviction = 0
        self.last_forward_tokens = 0
        self.evicted = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        init_empty_layer(self, key_states, key_states if value_states is None else value_states)
        self.positions = torch.empty(*key_states.shape[:2], 0, dtype=torch.long, device=key_states.device)

    @property
    def kept(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        batch, heads = key_states.shape[:2]
        new_positions = torch.arange(self.seen, self.seen + new, device=key_states.device).expand(batch, heads, new)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self.seen += new
        self.forwards_since_eviction += 1
        self.last_forward_tokens = new
        return self.keys, self.values

    def resident_positions(self) -> torch.Tensor:
        """Positions of the tokens attention sees, in the order `update` hands them over."""
        return self.positions

    def resident_scores(self) -> torch.Tensor | None:
        return self.scores

    def set_resident_scores(self, scores: torch.Tensor) -> None:
        self.scores = scores

    def observe_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        """Fold this forward's attention into the scores (called from the attention function
        with the exact K/V that attention is about to read)."""
        if not self.scorer.needs_attention or key.shape[-2] != self.kept:
            return
        ctx = ScoreContext(key=key, positions=self.resident_positions(), seen=self.seen, query=query, scaling=scaling)
        current = self.scorer.score(ctx)
        previous = self.resident_scores()
        if previous is not None:
            previous = torch.nn.functional.pad(previous, (0, current.shape[-1] - previous.shape[-1]))
        self.set_resident_scores(self.scorer.combine(previous, current, ctx))

    def after_forward(self) -> None:
        """Evict down to the budget when due (after a prefill, and every `every` forwards)."""
        if not self.is_initialized:
            return
        budget = self.evictor.budget(self.seen)
        if self.kept <= budget:
            return
        prefill = self.last_forward_tokens > 1
        if not prefill and self.forwards_since_eviction < self.evictor.params.every:
            return
        self._evict(budget)
        self.forwards_since_eviction = 0

    def _evict(self, budget: int) -> None:
        keep, dropped = self._ranked_split(budget)
        if self.offloader is not None:
            self.offloaded.append(tuple(self.offloader.to_host(t) for t in self._take(dropped)))
        self._keep(keep)

    def _ranked_split(self, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ([B, Hkv, n], sequence order) of the `budget` best-scored tokens of this layer's
        own K/V (sinks and the recent window first), and of the rest."""
        if self.scorer.needs_attention:
            if self.scores is None or self.scores.shape[-1] != self.keys.shape[-2]:
                raise RuntimeError("kvpatch eviction: attention scores are missing; was the attention observer installed?")
            scores = self.scores
        else:
            scores = self.scorer.score(ScoreContext(key=self.keys, positions=self.positions, seen=self.seen))
        if self.evictor.params.granularity == "layer":
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        protected = self.evictor.protected(self.positions, self.seen, budget)
        ranked = scores.float().masked_fill(protected, float("inf"))
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        return order[..., :budget].sort(dim=-1).values, order[..., budget:].sort(dim=-1).values

    def _keep(self, keep: torch.Tensor) -> None:
        self.keys, self.values, self.positions = self._take(keep)
        if self.scores is not None:
            self.scores = self.scores.gather(2, keep) if self.scorer.needs_attention else None
        self.evicted += 1

    def _take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and positions of the tokens at `index` ([B, Hkv, n]) of each head."""
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        return self.keys.gather(2, gather), self.values.gather(2, gather), self.positions.gather(2, index)

    def restore(self) -> None:
        """Bring every offloaded token back, in sequence order. The budget applies again after
        the next forward (use that forward to read the whole context)."""
        if not self.offloaded:
            return
        device = self.keys.device
        chunks = [tuple(self.offloader.to_device(t, device) for t in chunk) for chunk in self.offloaded]
        self.offloaded = []
        keys = torch.cat([self.keys, *(c[0] for c in chunks)], dim=2)
        values = torch.cat([self.values, *(c[1] for c in chunks)], dim=2)
        positions = torch.cat([self.positions, *(c[2] for c in chunks)], dim=2)
        self.keys, self.values, self.positions = keys, values, positions
        self.keys, self.values, self.positions = self._take(positions.argsort(dim=-1))
        self.scores = None  # re-scored by the next forward

    def kv_tensors(self) -> list[torch.Tensor | None]:
        return [self.keys, self.values, *(t for chunk in self.offloaded for t in chunk[:2])]

    def offloaded_kv_tensors(self) -> list[torch.Tensor]:
        """The evicted tokens' host copies: held, but not read by attention until `restore()`."""
        return [t for chunk in self.offloaded for t in chunk[:2]]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        return self.kept + query_length(query), self.seen - self.kept

    def _index_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for name in ("keys", "values", "positions", "scores"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        self.offloaded = [tuple(t.index_select(0, index.to(t.device)) for t in chunk) for chunk in self.offloaded]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = torch.as_tensor(indices)
        self._index_batch(index.nonzero().flatten() if index.dtype == torch.bool else index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "positions", "scores"):
                tensor = getattr(self, name)
                if tensor is not None:
                    setattr(self, name, tensor.repeat_interleave(repeats, dim=0))
            self.offloaded = [tuple(t.repeat_interleave(repeats, dim=0) for t in chunk) for chunk in self.offloaded]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvpatch: an evicting cache cannot be cropped (assisted decoding is not supported with eviction)")

    def reset(self) -> None:
        self.positions = self.scores = None
        self.offloaded = []
        self.seen = self.forwards_since_eviction = self.evicted = 0
        super().reset()


@register_stage("evictor", "budget")
class BudgetEvictor(Stage):
    """Keeps at most a token budget per layer (fixed, or a fraction of the sequence so far)."""

    #: Its layers need `observe_attention` / `after_forward` calls (kvpatch.patch.cache_events).
    needs_cache_events: ClassVar[bool] = True

    Params = BudgetParams
    params: BudgetParams

    def __init__(self, params: BudgetParams) -> None:
        super().__init__(params)
        self.scorer: ScorerStage | None = None
        self.offloader: CpuOffloader | None = None

    def connect(self, stages: Sequence[Stage]) -> None:
        self.scorer = first_stage_of(stages, ScorerStage, "evictor/budget")
        # Optional: with an offloader (any stage of that kind: `to_host` / `to_device`), evicted
        # tokens go to host memory instead of away.
        self.offloader = next((s for s in stages if s.kind == "offloader"), None)  # type: ignore[assignment]

    def budget(self, seen: int) -> int:
        return budget_tokens(self.params.max_tokens, self.params.ratio, seen)

    def protected(self, positions: torch.Tensor, seen: int, budget: int) -> torch.Tensor:
        """Tokens that are never evicted: the sinks and the recent window."""
        recent = max(self.params.recent_tokens, int(self.params.recent_fraction * budget))
        return protected_tokens(positions, seen, self.params.sink_tokens, recent)

    def make_layer(self, layout: LayerLayout) -> CacheLayerMixin:
        if layout.sliding_window is not None:
            return DynamicSlidingWindowLayer(sliding_window=layout.sliding_window)
        if self.scorer is None:
            raise RuntimeError("evictor/budget was not connected to its pipeline's scorer")
        return EvictingLayer(self, self.scorer, self.offloader)

    def stats(self) -> dict[str, Any]:
        return {"budget": self.params.max_tokens if self.params.max_tokens is not None else f"{self.params.ratio:g} x seen"}
