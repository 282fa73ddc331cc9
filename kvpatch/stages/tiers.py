"""`evictor/tiered`: hot / warm / cold tiers of each layer's K/V, moved by importance.

- hot: full precision on the accelerator: the sinks, the recent window and the best-scored
  tokens (the `EvictingLayer` that `TieredLayer` extends holds them);
- warm: the config's quantizer codes on the accelerator (full precision when the config has no
  quantizer), decoded for attention: exact up to quantization;
- cold: the same codes in host memory through the offloader (pinned, or memory-mapped files);
  not attended until promoted.

This module is the stage: it finds its scorer, codec and offloader in the pipeline and builds
the layers. How tokens move between tiers is `tiered_layer.py`; how a tier stores its blocks of
codes is `tier_blocks.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from ..cache import LayerLayout
from ..quant.base import QuantizerStage
from ..registry import Stage, first_stage_of, register_stage
from ..stage_specs.tiers import TieredParams
from .evictor import protected_tokens
from .offloader import CpuOffloader
from .scorers import ScorerStage
from .tier_blocks import Codec, CodesLayout, FullPrecision, TierBlocks, resident_kv
from .tiered_layer import TieredLayer


@register_stage("evictor", "tiered")
class TieredEvictor(Stage):
    """Hot / warm / cold tiers with a budget each, demotion by score and promotion by the
    recent queries' attention; builds `TieredLayer`s."""

    needs_cache_events: ClassVar[bool] = True

    Params = TieredParams
    params: TieredParams

    def __init__(self, params: TieredParams) -> None:
        super().__init__(params)
        self.scorer: ScorerStage | None = None
        self.codec: Codec = FullPrecision()
        self.offloader: CpuOffloader | None = None
        self._compiled: dict[tuple, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
        self.counters = {"tokens_to_warm": 0, "blocks_to_cold": 0, "blocks_promoted": 0, "blocks_dropped": 0}

    @property
    def drops_cold(self) -> bool:
        return self.params.cold.max_tokens == 0

    def connect(self, stages: Sequence[Stage]) -> None:
        self.scorer = first_stage_of(stages, ScorerStage, "evictor/tiered")
        self.codec = next((s for s in stages if isinstance(s, QuantizerStage)), FullPrecision())
        # by kind, not class: any offloader stage (to_host / to_device) can hold the cold tier
        self.offloader = next((s for s in stages if s.kind == "offloader"), None)  # type: ignore[assignment]
        if self.offloader is None and not self.params.warm.unlimited and not self.drops_cold:
            raise ValueError("evictor/tiered: the warm tier has a budget, so tokens go cold, and cold needs an "
                             "offloader stage (offloader/cpu); or set cold: {max_tokens: 0} to drop them instead")

    def protected(self, positions: torch.Tensor, seen: int, budget: int) -> torch.Tensor:
        return protected_tokens(positions, seen, self.params.sink_tokens, self.params.recent_tokens)

    def resident_kv(self, warm: TierBlocks, layout: CodesLayout, hot_k: torch.Tensor,
                    hot_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warm decoded, then hot: the K/V attention reads. Runs every forward of every layer, so
        with `compile_decode` on an accelerator it is one compiled function (decode and
        concatenation fuse into a few kernels instead of a dozen per layer)."""
        tensors = {name: t for name, t in warm.tensors.items() if name.startswith(("key.", "value."))}
        if not self.params.compile_decode or hot_k.device.type == "cpu":
            return resident_kv(self.codec, layout, tensors, hot_k, hot_v)
        key = tuple(sorted(layout.items()))
        if key not in self._compiled:
            self._compiled[key] = torch.compile(functools.partial(resident_kv, self.codec, layout))
        return self._compiled[key](tensors, hot_k, hot_v)

    def make_layer(self, layout: LayerLayout) -> CacheLayerMixin:
        if layout.sliding_window is not None:
            return DynamicSlidingWindowLayer(sliding_window=layout.sliding_window)
        if self.scorer is None:
            raise RuntimeError("evictor/tiered was not connected to its pipeline's scorer")
        return TieredLayer(self, self.scorer, self.codec, self.offloader)

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)
