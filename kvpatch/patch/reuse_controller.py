"""`ReuseController`: chunk reuse around each prefill of a patched model.

Before a prefill (the patch layer's forward pre-hook) it chunks and hashes the prompt, finds
stored chunks, loads their K/V into the fresh cache, repairs what is not exact, and trims the
forward's inputs to the tokens still to compute. After the forward it writes newly computed
chunks back to the store, so the next request hits without an explicit warm().

Reuse only applies where it is invisible to the caller: a forward that keeps only the last
position's logits (`logits_to_keep=1`, what `generate` passes) into an empty cache. Other
forwards still feed the store. Batches may be left-padded (batch_layout.py): each row matches
its own real tokens; padding never enters a chunk, a hash or the stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..model_shapes import ModelShapes
from ..cache import KVPatchCache
from ..snapshot.fingerprint import model_fingerprint
from ..stages.reuse import CacheBlendRecompute
from ..reuse.blend import KVLayers, RepairPolicy, blend
from ..reuse.chunk import ChunkStore
from ..reuse.chunk_hash import ChunkHasher, token_bytes
from ..reuse.codecs import dense_kv
from ..reuse.matcher import MatchPlan
from ..reuse.rope import KeyRotator
from ..reuse.writeback import ChunkWriter, NewChunk
from .batch_layout import BatchLayout, batch_layout, right_aligned
from .reuse_stats import RequestStats, RowStats

logger = logging.getLogger("kvpatch")

#: Most host memory pinned up front for write-back buffers (see ChunkWriter).
PREWARM_CAP_BYTES = 8 * 2**30

#: Keyword arguments whose last dimension runs over the prompt's positions.
_POSITIONAL_KWARGS = ("input_ids", "position_ids")


@dataclass
class _Request:
    """Per-prefill state between the pre-forward and post-forward hooks."""

    token_ids: torch.Tensor  # [B, L] on CPU, padding included
    layout: BatchLayout
    plans: list[MatchPlan]  # per row, over its real tokens (positions from 0)
    computed_from: int  # the forward computes columns [computed_from, L)
    exact_until: list[int]  # per row: chunks ending at or before this are exact when computed
    #: (first column, per-layer [B, H, T, D] K/V): the assembled prefix, then the forward's part
    sources: list[tuple[int, KVLayers]] = field(default_factory=list)
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class ReuseController:
    """Runs a config's chunker, hasher, matcher, recompute and store stages for one model.

    Stages are found by kind and used through the methods of their kind (kvpatch/stages/reuse.py
    lists them), so a plug-in stage of any of these kinds runs as a built-in does."""

    def __init__(self, model: torch.nn.Module, stages: list[Any], namespace: str) -> None:
        self.model = model
        self.chunker = next(s for s in stages if s.kind == "chunker")
        hasher_stage = next((s for s in stages if s.kind == "hasher"), None)
        self.hasher = hasher_stage.make_hasher(namespace) if hasher_stage is not None else ChunkHasher(namespace)
        self.matcher = next(s for s in stages if s.kind == "matcher")
        self.recompute = next((s for s in stages if s.kind == "recompute"), None)
        self.store: ChunkStore = next(s for s in stages if s.kind == "store")
        self.store.bind(self.hasher, ModelShapes.of(model.config))  # refuse other models' chunks
        self.rotator: KeyRotator | None = None
        self.approximate = bool(self.matcher.approximate)
        if self.approximate:
            try:
                self.rotator = KeyRotator.for_model(model)
            except UnsupportedModelError as err:
                logger.warning("kvpatch: matcher/approximate: %s; reusing exact prefixes only", err)
                self.approximate = False
        budget = getattr(getattr(self.store, "params", None), "budget_bytes", 0)
        self.policy = repair_policy(self.matcher, self.recompute)
        self.writer = ChunkWriter(self.store, prewarm_bytes=min(int(budget), PREWARM_CAP_BYTES))
        self.last: RequestStats = RequestStats()
        self._request: _Request | None = None
        self._segment_starts: list[list[int]] = []
        self._host_ids_hint: torch.Tensor | None = None
        self._paused = False

    # -- the two hooks ----------------------------------------------------------------------------
    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block, prefills neither reuse nor store chunks (a no-reuse baseline)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def before_forward(self, kwargs: dict[str, Any], cache: KVPatchCache) -> dict[str, Any] | None:
        """Load reusable K/V into `cache` and return the trimmed kwargs (None: unchanged)."""
        self._request = None
        hint, self._host_ids_hint = self._host_ids_hint, None  # meant for this forward only
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.dim() != 2 or cache.get_seq_length() != 0:
            return None  # not a prefill
        mask = kwargs.get("attention_mask")
        layout = None if self._paused else batch_layout(input_ids, mask, kwargs.get("position_ids"))
        if layout is None:  # paused, or rows at positions no chunk describes: neither reuse nor store
            real = mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            counts = real or [input_ids.shape[1]] * input_ids.shape[0]
            self.last, self._segment_starts = RequestStats(rows=[RowStats(prompt_tokens=int(n)) for n in counts]), []
            return None
        self.writer.flush(wait=False)  # copies still running belong to the previous request
        start = time.perf_counter()
        request = self._plan(input_ids, layout, hint)
        self.last = RequestStats(rows=[RowStats(prompt_tokens=n) for n in layout.real_tokens])
        self.last.lookup_ms = (time.perf_counter() - start) * 1e3
        self._request = request
        cache.recorder = self._record
        if kwargs.get("logits_to_keep") != 1 or input_ids.shape[1] < 2:
            return None
        start = time.perf_counter()
        computed_from = self._assemble(request, cache, input_ids)
        self.last.load_ms = (time.perf_counter() - start) * 1e3
        if computed_from == 0:
            return None
        request.computed_from = computed_from
        return _trim(kwargs, computed_from)

    def after_forward(self, cache: KVPatchCache) -> None:
        """Write the chunks computed exactly by this prefill back to the store."""
        cache.recorder = None
        request, self._request = self._request, None
        if request is None or not request.recorded:
            return
        layers = [request.recorded[i] for i in range(len(request.recorded))]
        request.sources.append((request.computed_from, layers))
        self.last.written_chunks = self._write_back(request)

    def set_segment_starts(self, starts: Sequence[int] | Sequence[Sequence[int]]) -> None:
        """Token offsets where the next prompt's segments begin (each starts a new chunk),
        counted from each row's first real token: one list for every row, or one per row."""
        per_row = bool(starts) and not isinstance(starts[0], int)
        self._segment_starts = [list(row) for row in starts] if per_row else [list(starts)]  # type: ignore[arg-type]

    def _row_segment_starts(self, row: int) -> list[int]:
        starts = self._segment_starts
        return starts[row] if len(starts) > 1 else (starts[0] if starts else [])

    def set_host_ids(self, token_ids: torch.Tensor) -> None:
        """A CPU copy of the next forward's input_ids (the Engine has one): hashing then needs no
        device-to-host copy, which would queue behind the previous request's write-back copies.
        Used only if its shape matches, and only for that one forward."""
        self._host_ids_hint = token_ids.detach()

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, input_ids: torch.Tensor, layout: BatchLayout, host_ids: torch.Tensor | None) -> _Request:
        usable = host_ids is not None and host_ids.device.type == "cpu" and host_ids.shape == input_ids.shape
        ids = host_ids if usable else input_ids.detach().cpu()
        plans = []
        for index, (row, pad) in enumerate(zip(ids, layout.pads)):
            real = row[pad:]  # padding never enters a chunk or a hash
            if real.numel() == 0:
                plans.append(MatchPlan([]))
                continue
            row_spans = self.chunker.spans(real.numpy(), self._row_segment_starts(index))
            row_prefix, row_content = self.hasher.hashes(token_bytes(real), row_spans, content=self.approximate)
            plans.append(self.matcher.match(row_spans, row_prefix, row_content, self.store,
                                            approximate=self.approximate))
        self._segment_starts = []
        return _Request(ids, layout, plans, computed_from=0, exact_until=layout.real_tokens)

    # -- assembly ---------------------------------------------------------------------------------
    def _assemble(self, request: _Request, cache: KVPatchCache, input_ids: torch.Tensor) -> int:
        """Fill `cache` with each row's reused (and repaired) K/V, right-aligned behind its padding
        (zeros there: masked), so that every column keeps its meaning for the caller's mask and
        position ids; returns the column the forward starts at."""
        layout = request.layout
        reach = [_reach(plan, n) for plan, n in zip(request.plans, layout.real_tokens)]
        start = layout.suffix_start(reach)
        if start <= 0:
            return 0
        rows = [self._row_kv(request, row, start - pad, input_ids) if start > pad else None
                for row, pad in enumerate(layout.pads)]
        layers = right_aligned(rows, start)
        for layer, (keys, values) in zip(cache.layers, layers):
            layer.update(keys, values)
        request.sources.append((0, layers))
        return start

    def _row_kv(self, request: _Request, row: int, take: int, input_ids: torch.Tensor) -> KVLayers:
        """One row's K/V of its first `take` real tokens (per layer `[H, take, D]`): stored
        chunks as they are, or laid out and repaired by `blend` when they are not a plain prefix
        (reused out of order, or after a missing chunk)."""
        plan, stats = request.plans[row], self.last.rows[row]
        if take <= plan.leading_exact_tokens():
            kv = self._gather(plan, take, input_ids.device, self.model.dtype)
            stats.reused_tokens = take
            return [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]
        ids = input_ids[row:row + 1, request.layout.pads[row]:]
        result = blend(self.model, plan, ids, self.rotator, self.policy, until=take)
        stats.reused_tokens, stats.approximate_tokens = result.reused_tokens, result.approximate_tokens
        stats.recomputed_tokens, stats.check_tokens = result.recomputed_tokens, result.check_tokens
        if result.first_approximate is not None:  # later chunks were computed over stale K/V
            request.exact_until[row] = result.first_approximate
        return [(keys[0], values[0]) for keys, values in result.layers]

    def _gather(self, plan: MatchPlan, until: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The stored K/V of a row's leading `until` tokens, `[L, 2, H, until, D]` on `device`."""
        parts = []
        for match in plan.matches:
            if match.span[0] >= until:
                break
            kv = dense_kv(match.chunk, device, dtype)
            parts.append(kv[..., : until - match.span[0], :])
        return torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]

    # -- write-back -------------------------------------------------------------------------------
    def _record(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._request is not None:
            self._request.recorded[layer_idx] = (keys, values)

    def _write_back(self, request: _Request) -> int:
        """Store every chunk not matched exactly whose K/V were computed exactly (all its
        history exact), from the computed ranges covering its columns."""
        sources = [t for _, layers in request.sources for pair in layers for t in pair]
        with self.writer.off_the_compute_stream(sources):  # the first token never waits for this
            new = self._new_chunks(request)
            self.writer.write(new, self._codec())
        return len(new)

    def _new_chunks(self, request: _Request) -> list[NewChunk]:
        """The chunks `_write_back` stores: per row, those not matched exactly and computed with
        an exact history, cut out of the computed ranges."""
        new = []
        for row, (plan, pad) in enumerate(zip(request.plans, request.layout.pads)):
            chosen = [i for i, match in enumerate(plan.matches)
                      if match.kind != "exact" and match.span[1] <= request.exact_until[row]]
            spans = [(pad + plan.matches[i].span[0], pad + plan.matches[i].span[1]) for i in chosen]
            for i, kv in zip(chosen, _chunk_kvs(request.sources, row, spans)):
                if kv is None:
                    continue
                match = plan.matches[i]
                tokens = request.token_ids[row, pad + match.span[0]:pad + match.span[1]].clone()
                content = match.content_hash or self.hasher.content_hash(token_bytes(tokens))
                parent = plan.matches[i - 1].prefix_hash if i else self.hasher.namespace
                new.append(NewChunk(match.prefix_hash, content, tokens, match.span[0], kv, parent))
        return new

    def _codec(self) -> str:
        return getattr(getattr(self.store, "params", None), "codec", "dense")


def repair_policy(matcher: Any, recompute: Any | None) -> RepairPolicy:
    """The repair of approximate chunks that a config's matcher and recompute stages ask for
    (the recompute stage's `strategy`, and its own `recompute_positions` if it has one)."""
    forced = getattr(matcher.params, "repair", None) == "cacheblend"
    strategy = "cacheblend" if forced else getattr(recompute, "strategy", "none")
    extra = None if forced else getattr(recompute, "recompute_positions", None)
    params = recompute.params if recompute is not None else None
    blend_params = params if isinstance(recompute, CacheBlendRecompute) else CacheBlendRecompute.Params()
    return RepairPolicy(strategy=strategy, seam_tokens=getattr(params, "seam_tokens", 0),
                        sink_tokens=getattr(params, "sink_tokens", 0), ratio=blend_params.ratio,
                        check_layer=blend_params.check_layer, extra=extra)


def reuse_namespace(model: torch.nn.Module) -> str:
    """What chunk keys are namespaced by: the model's type, dtype, architecture and weights."""
    return model_fingerprint(model).model_dump_json()


def _reach(plan: MatchPlan, real_tokens: int) -> int:
    """How many leading tokens of a row the store could supply (the last one is always computed)."""
    end = plan.leading_exact_tokens() if plan.is_plain_prefix else plan.last_reused_end()
    return max(min(end, real_tokens - 1), 0)


def _chunk_kvs(sources: list[tuple[int, KVLayers]], row: int, spans: list[tuple[int, int]]) -> list[torch.Tensor | None]:
    """`[L, 2, H, end-start, D]` K/V of each of one row's disjoint column spans (None where a
    column is not covered). Consecutive spans of one length inside one computed range (a fixed
    chunker's chunks) are gathered together: one stack of every layer's keys and values viewed
    as `[n, H, size, D]` gives `[n, L, 2, H, size, D]`, each chunk a contiguous slab of it. A
    16K-token prompt is 128 chunks: a slice per chunk, layer and part was 8K tensor ops of host
    time and a kernel per chunk. A span across two ranges (a prefix assembled from the store, then
    the forward's part) is gathered by `_slice_sources`."""
    out: list[torch.Tensor | None] = [None] * len(spans)
    for offset, layers in sources:
        stop = offset + layers[0][0].shape[-2]
        inside = sorted((i for i, (a, b) in enumerate(spans) if out[i] is None and offset <= a and b <= stop),
                        key=lambda i: spans[i][0])
        for run in _runs(inside, spans):
            first, size = spans[run[0]][0] - offset, spans[run[0]][1] - spans[run[0]][0]
            views = [part[row, :, first:first + len(run) * size].unflatten(1, (len(run), size)).transpose(0, 1)
                     for layer in layers for part in layer]
            block = torch.stack(views, dim=1).unflatten(1, (len(layers), 2))
            for j, i in enumerate(run):
                out[i] = block[j]
    return [kv if kv is not None else _slice_sources(sources, row, *span) for kv, span in zip(out, spans)]


def _runs(order: list[int], spans: list[tuple[int, int]]) -> list[list[int]]:
    """`order` (span indices by start) cut into runs of back-to-back spans of one length."""
    runs: list[list[int]] = []
    for i in order:
        last = runs[-1][-1] if runs else None
        if (last is not None and spans[last][1] == spans[i][0]
                and spans[last][1] - spans[last][0] == spans[i][1] - spans[i][0]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _slice_sources(sources: list[tuple[int, KVLayers]], row: int, start: int, end: int) -> torch.Tensor | None:
    """`[L, 2, H, end-start, D]` K/V of one row's columns `[start, end)` from the computed ranges
    covering them in order (None if a column is not covered), gathered in one copy per range (a
    chunk's own contiguous tensor; the prompt's K/V are never stacked whole)."""
    pieces, at = [], start
    for offset, layers in sources:
        stop = offset + layers[0][0].shape[-2]
        if offset <= at < stop:
            until = min(end, stop)
            pieces.append((layers, at - offset, until - offset))
            at = until
        if at == end:
            break
    if at != end:
        return None
    count = len(pieces[0][0])
    parts = [_joined([layers[i][part][row, :, a:b] for layers, a, b in pieces])
             for i in range(count) for part in (0, 1)]
    return torch.stack(parts).unflatten(0, (count, 2))


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=-2)


def _trim(kwargs: dict[str, Any], start: int) -> dict[str, Any]:
    """The forward's kwargs with positional inputs cut to positions `start` onwards."""
    out = dict(kwargs)
    for name in _POSITIONAL_KWARGS:
        value = out.get(name)
        if isinstance(value, torch.Tensor):
            out[name] = value[..., start:]
    position = out.get("cache_position")
    if isinstance(position, torch.Tensor):
        out["cache_position"] = position[start:]
    return out
