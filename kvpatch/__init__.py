"""kvpatch: YAML-configured KV-cache pipelines for HuggingFace causal LMs.

    handle = kvpatch.apply(model, "default")   # patch in place
    model.generate(...)                         # runs through kvpatch
    handle.stats(); kvpatch.unpatch(model)
"""

from .config import PipelineConfig, bundled_configs, load_config
from .engine import Engine, GenerationResult
from .errors import ConfigError, KVPatchError, PatchStateError, UnknownStageError, UnsupportedModelError
from .families import supported_families
from .graph_decode import CudaGraphDecoder
from .patch import KVPatchCache, PatchHandle, apply, get_handle, unpatch
from .registry import Stage, StageParams, available_stages, register_stage

from . import models  # noqa: E402  (kvpatch.models.load("kvpatch-ref") after a plain `import kvpatch`)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CudaGraphDecoder",
    "Engine",
    "GenerationResult",
    "KVPatchCache",
    "KVPatchError",
    "PatchHandle",
    "PatchStateError",
    "PipelineConfig",
    "Stage",
    "StageParams",
    "UnknownStageError",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "available_stages",
    "bundled_configs",
    "get_handle",
    "load_config",
    "models",
    "register_stage",
    "supported_families",
    "unpatch",
]
