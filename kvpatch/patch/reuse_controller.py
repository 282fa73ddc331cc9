"""`ReuseController`: chunk reuse around each prefill of a patched model.

Before a prefill (the patch layer's forward pre-hook) it chunks and hashes the prompt, finds
stored chunks, loads their K/V into the fresh cache, repairs what is not exact, and trims the
forward's inputs to the tokens still to compute. After the forward it writes newly computed
chunks back to the store, so the next request hits without an explicit warm().

Reuse only applies where it is invisible to the caller: a forward that keeps only the last
position's logits (`logits_to_keep=1`, what `generate` passes) into an empty cache, without
padding. Other forwards still feed the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..model_shapes import ModelShapes
from ..cache import KVPatchCache
from ..snapshot.fingerprint import model_fingerprint
from ..stages.reuse import CacheBlendRecompute
from ..reuse.blend import RepairPolicy, blend
from ..reuse.chunk import ChunkStore
from ..reuse.chunk_hash import ChunkHasher, token_bytes
from ..reuse.codecs import dense_kv
from ..reuse.matcher import MatchPlan
from ..reuse.rope import KeyRotator
from ..reuse.writeback import ChunkWriter, NewChunk

logger = logging.getLogger("kvpatch")

#: Most host memory pinned up front for write-back buffers (see ChunkWriter).
PREWARM_CAP_BYTES = 8 * 2**30

#: Keyword arguments whose last dimension runs over the prompt's positions.
_POSITIONAL_KWARGS = ("input_ids", "position_ids")


@dataclass
class RequestStats:
    """What reuse did for the last prefill (one per forward, summed over batch rows)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    approximate_tokens: int = 0
    recomputed_tokens: int = 0
    check_tokens: int = 0
    lookup_ms: float = 0.0
    load_ms: float = 0.0
    written_chunks: int = 0

    @property
    def kv_reuse_ratio(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def approximate_ratio(self) -> float:
        return self.approximate_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class _Request:
    """Per-prefill state between the pre-forward and post-forward hooks."""

    token_ids: torch.Tensor  # [B, L] on CPU
    plans: list[MatchPlan]
    computed_from: int  # the forward computes positions [computed_from, L)
    exact_until: list[int]  # per row: chunks ending at or before this are exact when computed
    sources: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
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
        self._segment_starts: list[int] = []
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
        if self._paused:
            return None
        self.writer.flush(wait=False)  # copies still running belong to the previous request
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.dim() != 2 or cache.get_seq_length() != 0:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or not bool(mask.all())):
            return None  # padded rows sit at shifted positions: neither reuse nor store them
        start = time.perf_counter()
        request = self._plan(input_ids, hint)
        self.last = RequestStats(prompt_tokens=input_ids.numel())
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

    def set_segment_starts(self, starts: list[int]) -> None:
        """Token offsets where the next prompt's segments begin (each starts a new chunk)."""
        self._segment_starts = list(starts)

    def set_host_ids(self, token_ids: torch.Tensor) -> None:
        """A CPU copy of the next forward's input_ids (the Engine has one): hashing then needs no
        device-to-host copy, which would queue behind the previous request's write-back copies.
        Used only if its shape matches, and only for that one forward."""
        self._host_ids_hint = token_ids.detach()

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, input_ids: torch.Tensor, host_ids: torch.Tensor | None) -> _Request:
        usable = host_ids is not None and host_ids.device.type == "cpu" and host_ids.shape == input_ids.shape
        ids = host_ids if usable else input_ids.detach().cpu()
        plans = []
        approximate = self.approximate and ids.shape[0] == 1
        for row in ids:
            tokens = row.numpy()  # indexable without a Python list of 16K ints
            row_spans = self.chunker.spans(tokens, self._segment_starts)
            row_prefix, row_content = self.hasher.hashes(token_bytes(row), row_spans, content=approximate)
            plans.append(self.matcher.match(row_spans, row_prefix, row_content, self.store, approximate=approximate))
        self._segment_starts = []
        return _Request(ids, plans, computed_from=0, exact_until=[ids.shape[1]] * ids.shape[0])

    # -- assembly ---------------------------------------------------------------------------------
    def _assemble(self, request: _Request, cache: KVPatchCache, input_ids: torch.Tensor) -> int:
        """Fill `cache` with reused (and repaired) K/V; returns how many leading tokens it holds."""
        length = input_ids.shape[1]
        device, dtype = input_ids.device, self.model.dtype
        if len(request.plans) == 1 and not request.plans[0].is_plain_prefix:
            return self._assemble_blended(request, cache, input_ids)
        reused = min(plan.leading_exact_tokens() for plan in request.plans)
        reused = min(reused, length - 1)  # the forward must compute at least the last token
        if reused == 0:
            return 0
        rows = [self._gather(plan, reused, device, dtype) for plan in request.plans]
        kv = rows[0].unsqueeze(2) if len(rows) == 1 else torch.stack(rows, dim=2)  # [L, 2, B, H, T, D]
        for index, layer in enumerate(cache.layers):
            layer.update(kv[index, 0], kv[index, 1])
        self.last.reused_tokens = reused * len(rows)
        return reused

    def _gather(self, plan: MatchPlan, until: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The stored K/V of a row's leading `until` tokens, `[L, 2, H, until, D]` on `device`."""
        parts = []
        for match in plan.matches:
            if match.span[0] >= until:
                break
            kv = dense_kv(match.chunk, device, dtype)
            parts.append(kv[..., : until - match.span[0], :])
        return torch.cat(parts, dim=3) if len(parts) > 1 else parts[0]

    def _assemble_blended(self, request: _Request, cache: KVPatchCache, input_ids: torch.Tensor) -> int:
        """One row with chunks reused out of prefix order or after a missing chunk (blend.py)."""
        result = blend(self.model, request.plans[0], input_ids, self.rotator, self.policy)
        for layer, (keys, values) in zip(cache.layers, result.layers):
            layer.update(keys, values)
        self.last.reused_tokens = result.reused_tokens
        self.last.approximate_tokens = result.approximate_tokens
        self.last.recomputed_tokens = result.recomputed_tokens
        self.last.check_tokens = result.check_tokens
        if result.first_approximate is not None:  # later chunks were computed over stale K/V
            request.exact_until = [result.first_approximate]
        request.sources.append((0, result.layers))
        return result.until

    # -- write-back -------------------------------------------------------------------------------
    def _record(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self._request is not None:
            self._request.recorded[layer_idx] = (keys, values)

    def _write_back(self, request: _Request) -> int:
        """Store every chunk not matched exactly whose K/V were computed exactly (all its
        history exact), from whichever computed range covers it."""
        new = []
        for row, plan in enumerate(request.plans):
            for i, match in enumerate(plan.matches):
                start, end = match.span
                if match.kind == "exact" or end > request.exact_until[row]:
                    continue
                kv = _slice_sources(request.sources, row, start, end)
                if kv is not None:
                    tokens = request.token_ids[row, start:end].clone()
                    content = match.content_hash or self.hasher.content_hash(token_bytes(tokens))
                    parent = plan.matches[i - 1].prefix_hash if i else self.hasher.namespace
                    new.append(NewChunk(match.prefix_hash, content, tokens, start, kv, parent))
        self.writer.write(new, self._codec())
        return len(new)

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


def _slice_sources(sources: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]], row: int,
                   start: int, end: int) -> torch.Tensor | None:
    """`[L, 2, H, end-start, D]` K/V of one row from the computed range covering it, gathered in
    one copy (a chunk's own contiguous tensor; the prompt's K/V are never stacked whole)."""
    for offset, layers in sources:
        if offset <= start and end <= offset + layers[0][0].shape[-2]:
            a, b = start - offset, end - offset
            parts = [t[row, :, a:b] for pair in layers for t in pair]
            return torch.stack(parts).unflatten(0, (len(layers), 2))
    return None


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
