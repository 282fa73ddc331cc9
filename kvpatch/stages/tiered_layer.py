"""`TieredLayer`: the cache layer of `evictor/tiered`, and the policy that moves its tokens
between tiers.

Demotion follows the scorer: after each forward, when hot is over its budget its lowest-scored
tokens are quantized into warm (in whole blocks of the quantizer, so each token is encoded
once), and when warm is over its budget its lowest-scored blocks move to cold. Promotion
(auto-restore): on every multi-token forward and every `promote_every` decode steps, cold and
warm blocks are scored against the recent queries with one softmax over both tiers, and cold
blocks that outscore warm ones swap places with them BEFORE this forward's attention runs (the
swap rewrites the warm slots of the K/V that attention is about to read), so a question that
refers to a cold passage is answered from it. A quantized token cannot regain precision, so
promotion brings blocks back to warm, not to hot. With tiers nothing is dropped unless the cold
budget says so (`cold: {max_tokens: 0}` drops what leaves warm).

The layer follows the eviction contract like `EvictingLayer`: `get_seq_length()` counts every
token seen, `get_mask_sizes(q)` is `(resident + q, seen - resident)`, `update` returns every
resident token (warm first, then hot, this forward's tokens last) and tiers move after the
forward. Blocks are per KV head: each head keeps its own tokens in each tier, same counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .evictor import EvictingLayer
from .offloader import CpuOffloader
from .scorers import ScoreContext, ScorerStage, attention_mass_under, key_logsumexp
from .tier_blocks import Codec, CodesLayout, TierBlocks, rank_blocks, unit_index

if TYPE_CHECKING:
    from .tiers import TieredEvictor


class TieredLayer(EvictingLayer):
    """Hot (the inherited dense K/V, positions, scores), warm (`TierBlocks` on the device) and
    cold (`TierBlocks` chunks in host memory)."""

    def __init__(self, stage: TieredEvictor, scorer: ScorerStage, codec: Codec, offloader: CpuOffloader | None) -> None:
        super().__init__(stage, scorer)
        self.stage, self.codec, self.cold_offloader = stage, codec, offloader
        self.block = math.lcm(codec.block_tokens("key"), codec.block_tokens("value"))
        self.warm: TierBlocks | None = None
        #: Chunks in the order they went cold; merged into one when a promotion needs them.
        self.cold: list[TierBlocks] = []
        #: The last queries: the promotion window, and every query not scored yet.
        self.recent_queries: torch.Tensor | None = None
        #: Queries (at the end of `recent_queries`) that the scorer has not seen yet.
        self.pending_queries = 0
        self.forwards_since_promotion = 0
        self._layout: CodesLayout = {}

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def hot_tokens(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    @property
    def warm_tokens(self) -> int:
        return self.warm.blocks * self.block if self.warm is not None else 0

    @property
    def cold_tokens(self) -> int:
        return sum(c.blocks for c in self.cold) * self.block

    @property
    def kept(self) -> int:
        """Tokens attention reads: hot + warm."""
        return self.hot_tokens + self.warm_tokens

    def tier_tokens(self) -> dict[str, int]:
        return {"hot": self.hot_tokens, "warm": self.warm_tokens, "cold": self.cold_tokens}

    def tier_bytes(self) -> dict[str, int]:
        """K/V bytes per tier (codes, scales included; positions and scores are bookkeeping)."""
        def nbytes(tensors: list[torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)
        hot = nbytes([self.keys, self.values]) if self.is_initialized else 0
        warm = nbytes(self.warm.kv_tensors()) if self.warm is not None else 0
        return {"hot": hot, "warm": warm, "cold": nbytes([t for c in self.cold for t in c.kv_tensors()])}

    # -- attention --------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hot_k, hot_v = super().update(key_states, value_states)
        if not self.warm_tokens:
            return hot_k, hot_v
        return self.stage.resident_kv(self.warm, self._layout, hot_k, hot_v)

    def resident_positions(self) -> torch.Tensor:
        if not self.warm_tokens:
            return self.positions
        return torch.cat([self.warm.tensors["pos"], self.positions], dim=-1)

    def resident_scores(self) -> torch.Tensor | None:
        if self.scores is None or not self.warm_tokens:
            return self.scores
        return torch.cat([self.warm.tensors["score"], self.scores], dim=-1)

    def set_resident_scores(self, scores: torch.Tensor) -> None:
        if self.warm_tokens:
            self.warm.tensors["score"] = scores[..., : self.warm_tokens].contiguous()
        self.scores = scores[..., self.warm_tokens :]

    def observe_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        """Keep the queries; promote when due (this forward's attention then reads the promoted
        blocks), then score the pending queries when due: on multi-token forwards, every
        `score_every` decode steps, and before any demotion (which ranks by the scores)."""
        if key.shape[-2] != self.kept:
            return
        params = self.stage.params
        self._remember(query)
        multi_token = query.shape[2] > 1
        if params.promote_every is not None:
            self.forwards_since_promotion += 1
            if multi_token or self.forwards_since_promotion >= params.promote_every:
                self.forwards_since_promotion = 0
                self._promote(key, value, scaling)
        if multi_token or self.pending_queries >= params.score_every or self._hot_excess() > 0:
            super().observe_attention(self.recent_queries[:, :, -self.pending_queries :], key, value, scaling)
            self.pending_queries = 0
            self._remember(None)

    def _remember(self, query: torch.Tensor | None) -> None:
        """Append `query` (if any) to the recent queries and keep the promotion window and every
        pending query; a trimmed view that would keep a much larger storage alive (a prefill
        chunk's queries) is copied."""
        window = self.stage.params.promote_window
        queries = self.recent_queries
        if query is not None:
            replaces = queries is None or (self.pending_queries == 0 and query.shape[2] >= window)
            queries = query if replaces else torch.cat([queries, query], dim=2)
            self.pending_queries += query.shape[2]
        keep = max(window, self.pending_queries)
        if queries is not None and queries.shape[2] > keep:
            queries = queries[:, :, -keep:]
            if queries.untyped_storage().nbytes() > 2 * queries.nbytes:
                queries = queries.clone()
        self.recent_queries = queries

    # -- moving tokens between tiers ----------------------------------------------------------------

    def after_forward(self) -> None:
        if not self.is_initialized:
            return
        self._demote_hot()
        self._demote_warm()
        self._trim_cold()

    def _hot_excess(self) -> int:
        """Hot tokens over budget that the next `after_forward` demotes (0: none; a decode step
        waits for a whole block of excess)."""
        budget = self.stage.params.hot.tokens(self.seen)
        excess = self.hot_tokens - budget if budget is not None else 0
        if excess <= 0 or (self.last_forward_tokens == 1 and excess < self.block):
            return 0
        return excess

    def _demote_hot(self) -> None:
        """Quantize the lowest-scored hot tokens into warm, whole blocks at a time."""
        excess = self._hot_excess()
        if excess == 0:
            return
        protected = self.stage.protected(self.positions, self.seen, 0)
        movable = int((~protected).sum(-1).min()) // self.block * self.block
        count = min(math.ceil(excess / self.block) * self.block, movable)
        if count <= 0:
            return
        keep, dropped = self._ranked_split(self.hot_tokens - count)
        keys, values, positions = self._take(dropped)
        scores = self.scores.gather(2, dropped) if self.scores is not None else torch.zeros_like(positions, dtype=torch.float32)
        demoted, self._layout = TierBlocks.encode(self.codec, self.block, keys, values, positions, scores)
        self.warm = demoted if self.warm is None else TierBlocks.cat([self.warm, demoted])
        self._keep(keep)
        self.stage.counters["tokens_to_warm"] += count

    def _demote_warm(self) -> None:
        """Move the lowest-scored warm blocks to cold (or drop them if cold's budget is 0)."""
        budget = self.stage.params.warm.tokens(self.seen)
        if budget is None or self.warm is None or self.warm.blocks * self.block <= budget:
            return
        kept, leaving_index = rank_blocks(self._block_scores(self.warm), budget // self.block)
        leaving = self.warm.take(leaving_index)
        self.warm = self.warm.take(kept)
        self.stage.counters["blocks_to_cold"] += leaving.blocks
        if self.stage.drops_cold:
            self.stage.counters["blocks_dropped"] += leaving.blocks
            return
        self.cold.append(leaving.map(self.cold_offloader.to_host))

    def _trim_cold(self) -> None:
        """Drop the lowest-scored cold blocks beyond cold's budget (only when one is set)."""
        budget = self.stage.params.cold.tokens(self.seen)
        if budget is None or self.stage.drops_cold or self.cold_tokens <= budget:
            return
        cold = self._merged_cold()
        keep_blocks = budget // self.block
        kept, _ = rank_blocks(self._block_scores(cold), keep_blocks)
        self.stage.counters["blocks_dropped"] += cold.blocks - keep_blocks
        self.cold = [cold.take(kept).map(self.cold_offloader.to_host)]

    def _promote(self, key: torch.Tensor, value: torch.Tensor, scaling: float) -> None:
        """Swap cold blocks that the recent queries attend to more than to some warm blocks
        (one softmax over every old token of both tiers and hot) into those warm slots, also in
        the `key` / `value` that this forward's attention reads."""
        if not self.cold or not self.warm_tokens:
            return
        cold = self._merged_cold()
        host = next(iter(cold.tensors.values())).device
        queries = self.recent_queries[:, :, -self.stage.params.promote_window :]
        old = key[..., : key.shape[-2] - self.last_forward_tokens, :]
        # cold keys are scored on the accelerator: their codes are small to copy, host math is slow
        cold_keys, _ = self._decode(cold.keys_only().map(lambda t: self.cold_offloader.to_device(t, key.device)), values=False)
        lse = torch.logaddexp(key_logsumexp(queries, old, scaling), key_logsumexp(queries, cold_keys, scaling))
        cold_mass = attention_mass_under(queries, cold_keys, scaling, lse)
        warm_mass = attention_mass_under(queries, key[..., : self.warm_tokens, :], scaling, lse)
        count = min(self.stage.params.promote_blocks, cold.blocks, self.warm.blocks)
        batch, heads = warm_mass.shape[:2]
        cold_best, cold_index = cold_mass.view(batch, heads, -1, self.block).amax(-1).topk(count, dim=-1)
        warm_worst, warm_index = warm_mass.view(batch, heads, -1, self.block).amax(-1).topk(count, dim=-1, largest=False)
        swap = cold_best > warm_worst
        if not bool(swap.any()):
            return
        displaced = self.warm.take(warm_index)
        self.cold_offloader.wait()
        arriving = cold.take(cold_index).map(lambda t: self.cold_offloader.to_device(t, key.device))
        # a promoted block takes at least the rank of the block it displaced, so it is not the
        # first to go cold again on the next demotion
        floor = displaced.token_view("score").amax(-1, keepdim=True).expand(-1, -1, -1, self.block).flatten(2)
        arriving.tensors["score"] = torch.maximum(arriving.tensors["score"], floor)
        incoming = TierBlocks.where(swap, arriving, displaced)
        self.warm.put(warm_index, incoming)
        cold.put(cold_index, TierBlocks.where(swap, displaced.map(lambda t: t.to(host)), cold.take(cold_index)))
        new_k, new_v = self._decode(incoming)
        key.scatter_(2, unit_index(warm_index, self.block, key), new_k)
        value.scatter_(2, unit_index(warm_index, self.block, value), new_v)
        self.stage.counters["blocks_promoted"] += int(swap.sum())

    def restore(self) -> None:
        """Bring every cold block back to warm (the budgets apply again after the next forward)."""
        if self.cold:
            device = self.keys.device
            back = self._merged_cold().map(lambda t: self.cold_offloader.to_device(t, device))
            self.warm = back if self.warm is None else TierBlocks.cat([self.warm, back])
            self.cold = []

    # -- helpers ------------------------------------------------------------------------------------

    def _decode(self, tier: TierBlocks, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys (and values) of a tier in the cache's dtype, on the tier's device."""
        return tier.decode(self.codec, self._layout, self.dtype, values)

    def _merged_cold(self) -> TierBlocks:
        if len(self.cold) > 1:
            self.cold_offloader.wait()
            self.cold = [TierBlocks.cat(self.cold).map(self.cold_offloader.to_host)]
        return self.cold[0]

    def _block_scores(self, tier: TierBlocks) -> torch.Tensor:
        """Importance of each block `[B, H, blocks]`: its best token's score."""
        if self.scorer.needs_attention:
            scores = tier.tensors["score"]
        else:
            keys, _ = self._decode(tier, values=False)
            scores = self.scorer.score(ScoreContext(key=keys, positions=tier.tensors["pos"], seen=self.seen))
        return scores.view(*scores.shape[:2], tier.blocks, self.block).amax(-1)

    def kv_tensors(self) -> list[torch.Tensor | None]:
        warm = self.warm.kv_tensors() if self.warm is not None else []
        return [self.keys, self.values, *warm, *(t for c in self.cold for t in c.kv_tensors())]

    def offloaded_kv_tensors(self) -> list[torch.Tensor]:
        """The cold tier (host memory): attention reads hot + warm only."""
        return [t for c in self.cold for t in c.kv_tensors()]

    def _map_tiers(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.warm is not None:
            self.warm = self.warm.map(fn)
        self.cold = [c.map(fn) for c in self.cold]
        if self.recent_queries is not None:
            self.recent_queries = fn(self.recent_queries)

    def _index_batch(self, index: torch.Tensor) -> None:
        super()._index_batch(index)
        self._map_tiers(lambda t: t.index_select(0, index.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_tiers(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.warm, self.cold, self.recent_queries = None, [], None
        self.forwards_since_promotion = self.pending_queries = 0
        super().reset()
