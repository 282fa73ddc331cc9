"""kvpatch: YAML-configured KV-cache pipelines for HuggingFace causal LMs.

    handle = kvpatch.apply(model, "default")   # patch in place
    model.generate(...)                         # runs through kvpatch
    handle.stats(); kvpatch.unpatch(model)

The public names are imported on first use (PEP 562 `__getattr__`), so that `import kvpatch`
and the `kvpatch` command line's help and listings do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the submodule (relative to kvpatch) that defines it.
_LAZY: dict[str, str] = {
    "PipelineConfig": ".config",
    "bundled_configs": ".config",
    "load_config": ".config",
    "Engine": ".engine",
    "GenerationResult": ".engine",
    "ConfigError": ".errors",
    "KVPatchError": ".errors",
    "PatchStateError": ".errors",
    "UnknownStageError": ".errors",
    "UnsupportedModelError": ".errors",
    "supported_families": ".families",
    "CudaGraphDecoder": ".graph_decode",
    "KVPatchCache": ".patch",
    "PatchHandle": ".patch",
    "apply": ".patch",
    "get_handle": ".patch",
    "unpatch": ".patch",
    "Stage": ".registry",
    "StageParams": ".registry",
    "available_stages": ".registry",
    "register_stage": ".registry",
}
_LAZY_MODULES = ("models",)  # kvpatch.models.load("kvpatch-ref") after a plain `import kvpatch`

if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from . import models
    from .config import PipelineConfig, bundled_configs, load_config
    from .engine import Engine, GenerationResult
    from .errors import ConfigError, KVPatchError, PatchStateError, UnknownStageError, UnsupportedModelError
    from .families import supported_families
    from .graph_decode import CudaGraphDecoder
    from .patch import KVPatchCache, PatchHandle, apply, get_handle, unpatch
    from .registry import Stage, StageParams, available_stages, register_stage


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _LAZY_MODULES or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule (`kvpatch.eval`, `kvpatch.snapshot`, ...): reachable after a plain `import kvpatch`,
        # as when this file imported everything eagerly
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
