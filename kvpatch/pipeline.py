"""`Pipeline`: the built stages of one config, and the only object that knows the stage list.

The patch layer asks it for new caches and for stats; later stages (reuse, eviction, tiers) hook
in here, never into each other.
"""

from __future__ import annotations

from typing import Any, Protocol

from transformers.cache_utils import CacheLayerMixin

from .config import PipelineConfig, StageConfig
from .errors import ConfigError
from .model_shapes import ModelShapes
from .cache import KVPatchCache, LayerLayout, layer_layouts
from .registry import Stage


class StorageStage(Protocol):
    def make_layer(self, layout: LayerLayout) -> CacheLayerMixin: ...


class Pipeline:
    """Stages built from a validated config, in config order."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.stages: list[Stage] = [stage.build() for stage in config.stages]
        storage = [s for s in self.stages if s.kind == "storage"]
        self.storage: StorageStage = storage[0] if storage else StageConfig(kind="storage", impl="dense").build()
        for stage in self.stages:
            stage.connect(self.stages)
        builders = [s for s in self.stages if s.builds_layers and s is not self.storage]
        #: The stage whose `make_layer` builds the cache (an evictor, or else the storage stage).
        self.layer_builder: StorageStage = builders[0] if builders else self.storage

    @property
    def has_reuse(self) -> bool:
        """Whether the config reuses chunks across requests (it has a chunker stage)."""
        return any(s.kind == "chunker" for s in self.stages)

    def validate_model(self, model_config: Any) -> None:
        """Refuse, before anything is patched, a config whose stages cannot work on this model's
        shapes (one ConfigError naming each stage, field, the model's value and what was expected)."""
        shapes = ModelShapes.of(model_config)
        problems = [f"stage {s.kind}/{s.name}: {problem}" for s in self.stages for problem in s.model_problems(shapes)]
        if problems:
            raise ConfigError(
                f"kvpatch config {self.config.source} does not fit this {shapes.model_type} model "
                f"(head_dim {shapes.head_dim}, {shapes.num_layers} layers, vocabulary {shapes.vocab_size}): "
                + "; ".join(problems)
            )

    def new_cache(self, model_config: Any) -> KVPatchCache:
        """A fresh, empty cache for a model with `model_config`."""
        layers = [self.layer_builder.make_layer(layout) for layout in layer_layouts(model_config)]
        return KVPatchCache(layers, owner=self)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {f"{s.kind}/{s.name}": s.stats() for s in self.stages}
