"""Token-importance scorers: which cached tokens matter, from kvpatch's own attention call.

A scorer turns what one forward's attention saw into a score per cached token and per KV head
(`[batch, kv_heads, tokens]`, higher = keep), and says how that evidence combines with the
scores it had before. The evictor (`evictor/budget`) keeps the best-scored tokens. Scores are
computed from queries and keys in chunks of queries, so the full attention matrix of a long
prefill is never materialised (SnapKV, TOVA and hybrid only ever look at a window of queries).

Scorers see raw `q·k` logits: Gemma-2 style soft-capping and gpt-oss attention sinks are not applied
to scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import Stage, register_stage
from ..stage_specs.scorers import HybridParams, SnapKVParams

#: Queries scored at once, at most; fewer when keys are many, so that the transient
#: `[B, Hq, chunk, Tk]` float32 probability block stays under PROBS_BUDGET elements.
QUERY_CHUNK = 256
PROBS_BUDGET = 1 << 26


@dataclass
class ScoreContext:
    """What a scorer may look at for one layer after one forward."""

    key: torch.Tensor  # [B, Hkv, Tk, D]: every token the layer holds, this forward's included
    positions: torch.Tensor  # [B, Hkv, Tk]: each token's position in the sequence
    seen: int  # tokens of the sequence so far (the last position + 1)
    query: torch.Tensor | None = None  # [B, Hq, Tq, D]: this forward's queries (attention scorers)
    scaling: float = 1.0


def attention_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, last_queries: int | None = None) -> torch.Tensor:
    """Softmax attention of (the last `last_queries` of) the queries, summed over those queries
    and over the query heads sharing each KV head: `[B, Hkv, Tk]`, causal bottom-right aligned.

    This is most of a long prefill's cost under an attention scorer, so each chunk of queries
    costs three passes over its `[B, Hkv, G, c, Tk]` logits (matmul, softmax, sum): the scaling
    is folded into the queries, only the chunk's last keys (the only ones its queries may not
    see) are masked, and the logits are computed in the keys' dtype (tensor cores for a 16-bit
    cache on a GPU; their 2^-8 relative rounding only reorders near-ties) with the softmax in
    float32.
    """
    q_len = query.shape[2]
    k_len = key.shape[2]
    if last_queries is not None:
        query = query[:, :, -last_queries:]
    first = q_len - query.shape[2]  # index (within this forward) of the first scored query
    grouped = _key_chunks(query, key, scaling)[0].to(key.dtype)
    keys_t = key.transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Tk]
    mass = torch.zeros(key.shape[:3], device=key.device, dtype=torch.float32)
    rows = max(1, min(QUERY_CHUNK, PROBS_BUDGET // (query.shape[0] * query.shape[1] * k_len)))
    for start in range(0, grouped.shape[3], rows):
        logits = grouped[:, :, :, start : start + rows] @ keys_t  # [B, Hkv, G, c, Tk]
        # query i (of q_len) sees keys up to k_len - q_len + i: only keys past the chunk's first
        # query's last one can be hidden
        first_visible = k_len - q_len + first + start
        if first_visible + 1 < k_len:
            tail = torch.arange(first_visible + 1, k_len, device=key.device)
            hidden = tail[None, :] > first_visible + torch.arange(logits.shape[3], device=key.device)[:, None]
            logits[..., first_visible + 1 :].masked_fill_(hidden, float("-inf"))
        mass += logits.softmax(-1, dtype=torch.float32).sum(dim=(2, 3))
    return mass


def _key_chunks(query: torch.Tensor, key: torch.Tensor, scaling: float) -> tuple[torch.Tensor, int]:
    """Scaled queries grouped by KV head `[B, Hkv, G, Q, D]` (float32; scaling the queries is
    one pass over Q x D instead of one over every logit) and a key-chunk size that keeps the
    transient logits block under PROBS_BUDGET elements."""
    batch, q_heads, q_len, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], q_heads // key.shape[1], q_len, dim).float() * scaling
    return grouped, max(1, PROBS_BUDGET // max(1, batch * q_heads * q_len))


def key_logsumexp(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """log sum_k exp(q·k * scaling) of each query over every key (no causal mask: for keys that
    all precede the queries), `[B, Hkv, G, Q]`. Two key sets on different devices share one
    softmax through `torch.logaddexp` of their results."""
    grouped, rows = _key_chunks(query, key, scaling)
    out = torch.full(grouped.shape[:-1], float("-inf"), device=key.device)
    for start in range(0, key.shape[2], rows):
        block = key[:, :, start : start + rows].float().transpose(-1, -2).unsqueeze(2)
        out = torch.logaddexp(out, (grouped @ block).logsumexp(-1))
    return out


def attention_mass_under(query: torch.Tensor, key: torch.Tensor, scaling: float, log_normalizer: torch.Tensor) -> torch.Tensor:
    """Attention mass `[B, Hkv, Tk]` that keys that all precede the queries receive when the
    softmax normaliser is `log_normalizer` (from `key_logsumexp`, possibly over more keys than
    these): summed over queries and over the query heads of each KV head."""
    grouped, rows = _key_chunks(query, key, scaling)
    parts = []
    for start in range(0, key.shape[2], rows):
        block = key[:, :, start : start + rows].float().transpose(-1, -2).unsqueeze(2)
        parts.append(((grouped @ block) - log_normalizer.unsqueeze(-1)).exp().sum(dim=(2, 3)))
    if not parts:
        return key.new_zeros(key.shape[:3], dtype=torch.float32)
    return torch.cat(parts, dim=-1)


class ScorerStage(Stage, ABC):
    """Base of scorers: `score` gives this forward's evidence, `combine` merges it with history."""

    #: Whether `score` needs this forward's queries (attention-based) or only keys/positions.
    needs_attention: ClassVar[bool] = True

    @abstractmethod
    def score(self, ctx: ScoreContext) -> torch.Tensor: ...

    def combine(self, previous: torch.Tensor | None, current: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """`previous` is aligned to `current` (zeros for tokens it never scored). Default: the
        newest evidence replaces the old."""
        return current


@register_stage("scorer", "h2o")
class H2OScorer(ScorerStage):
    """Heavy hitters (H2O): attention each token has received, accumulated over every query."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return attention_mass(ctx.query, ctx.key, ctx.scaling)

    def combine(self, previous: torch.Tensor | None, current: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        return current if previous is None else previous + current


@register_stage("scorer", "snapkv")
class SnapKVScorer(ScorerStage):
    """SnapKV: attention from an observation window of the last queries, pooled over
    neighbouring tokens so that a kept token keeps its context."""

    Params = SnapKVParams
    params: SnapKVParams

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        mass = attention_mass(ctx.query, ctx.key, ctx.scaling, last_queries=self.params.window)
        k = self.params.kernel
        if k == 1:
            return mass
        flat = mass.flatten(0, 1).unsqueeze(1)
        pool = torch.nn.functional.avg_pool1d if self.params.pooling == "avg" else torch.nn.functional.max_pool1d
        return pool(flat, kernel_size=k, stride=1, padding=k // 2)[..., : mass.shape[-1]].reshape(mass.shape)

    def combine(self, previous: torch.Tensor | None, current: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        # A prefill (at least a full window of queries) re-scores everything; decode steps add
        # their single-query evidence, as SnapKV itself compresses only once after the prompt.
        if previous is None or ctx.query.shape[2] >= self.params.window:
            return current
        return previous + current


@register_stage("scorer", "tova")
class TOVAScorer(ScorerStage):
    """TOVA: the current (last) query's attention, averaged over heads; no history."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return attention_mass(ctx.query, ctx.key, ctx.scaling, last_queries=1)


@register_stage("scorer", "streaming")
class StreamingScorer(ScorerStage):
    """StreamingLLM: recency only. With the evictor's sink tokens this keeps the sinks plus the
    most recent window."""

    needs_attention = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.positions.float()


@register_stage("scorer", "key_norm")
class KeyNormScorer(ScorerStage):
    """Key-norm heuristic (Devoto et al. 2024): tokens with a small key L2 norm tend to draw
    attention, so a low norm scores high. Needs no attention at all."""

    needs_attention = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.key.float().norm(dim=-1)


@register_stage("scorer", "hybrid")
class HybridScorer(ScorerStage):
    """`decay * old + w_attn * attention + w_recency * recency`: attention of the last `window`
    queries (mean per query), recency as position / sequence length. Sinks are protected by the
    evictor's `sink_tokens`."""

    Params = HybridParams
    params: HybridParams

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        n_queries = min(self.params.window, ctx.query.shape[2])
        groups = ctx.query.shape[1] // ctx.key.shape[1]
        attention = attention_mass(ctx.query, ctx.key, ctx.scaling, last_queries=n_queries) / (n_queries * groups)
        recency = (ctx.positions.float() + 1) / ctx.seen
        return self.params.w_attn * attention + self.params.w_recency * recency

    def combine(self, previous: torch.Tensor | None, current: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        return current if previous is None else self.params.decay * previous + current
