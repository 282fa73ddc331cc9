"""The one registry of pipeline stages.

A stage is a class with a `kind` (what job it does in the pipeline), a `name` (which
implementation), a typed `Params` model (what a YAML may set), and `lossless` (whether it can
change the model's outputs). Adding a stage is one new module in `kvpatch/stages/` that defines
the class under `@register_stage(kind, name)`; it is discovered automatically, validated by
`load_config`, and picked up by the parametrised tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from .errors import UnknownStageError

if TYPE_CHECKING:
    from .model_shapes import ModelShapes

#: Every stage kind the pipeline knows, with the job it does. Kinds are fixed here (not by
#: registration) so that a typo in a config's `kind` is caught even before any stage exists.
STAGE_KINDS: dict[str, str] = {
    "storage": "how each layer holds its K/V (dense, quantized, tiered); builds the cache layers",
    "chunker": "splits a prompt into reusable chunks",
    "hasher": "keys chunks by prefix-chained and content-only hashes",
    "index": "maps chunk hashes to store slots",
    "matcher": "finds cached chunks that a new prompt can reuse",
    "recompute": "repairs reused K/V at chunk seams",
    "store": "keeps chunk K/V across requests (RAM, disk, remote)",
    "scorer": "scores token importance from attention",
    "evictor": "drops or demotes tokens to meet a budget",
    "quantizer": "encodes and decodes K/V at reduced precision",
    "offloader": "moves K/V between devices, host memory and files",
}


class StageParams(BaseModel):
    """Base of every stage's params model: unknown keys are errors, values are immutable, and
    types are strict (`true` is not a number, "4" is not an int); bounds come from `kvpatch.params`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Stage:
    """Base class of every stage. Subclasses set `Params` and may override `stats`."""

    kind: ClassVar[str]
    name: ClassVar[str]
    lossless: ClassVar[bool] = True
    #: Stage kinds this stage works with; a config that uses it without them is rejected.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Whether the stage builds the cache layers (`make_layer`). A config has at most one such
    #: stage besides the default `storage/dense`.
    builds_layers: ClassVar[bool] = False
    Params: ClassVar[type[StageParams]] = StageParams

    def __init__(self, params: StageParams) -> None:
        self.params = params

    @classmethod
    def is_lossless(cls, params: StageParams) -> bool:
        """Whether the stage, configured with `params`, leaves outputs unchanged. Defaults to the
        class's `lossless`; stages whose params decide it (a store's codec) override this."""
        return cls.lossless

    def connect(self, stages: "Sequence[Stage]") -> None:
        """Called once all of a pipeline's stages are built: find the ones named in `requires`."""

    def model_problems(self, shapes: "ModelShapes") -> list[str]:
        """Why this stage cannot work on a model of these shapes (empty: it can). `apply` asks
        before patching, so a group size that does not divide head_dim fails there, not mid-generate."""
        return []

    def stats(self) -> dict[str, Any]:
        """Counters a user may want from `handle.stats()` (empty by default)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


S = TypeVar("S", bound=type[Stage])
T = TypeVar("T", bound=Stage)


def first_stage_of(stages: Sequence[Stage], cls: type[T], needed_by: str) -> T:
    """The first of a pipeline's stages that is a `cls` (for `Stage.connect`)."""
    for stage in stages:
        if isinstance(stage, cls):
            return stage
    raise ValueError(f"{needed_by} needs a {cls.__name__} in the same config")

_REGISTRY: dict[str, dict[str, type[Stage]]] = {kind: {} for kind in STAGE_KINDS}
_builtins_loaded = False


def register_stage(kind: str, name: str) -> Callable[[S], S]:
    """Class decorator: register `cls` as implementation `name` of stage `kind`."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"cannot register stage {name!r}: unknown kind {kind!r}; kinds are {sorted(STAGE_KINDS)}")

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"{cls!r} must subclass kvpatch.registry.Stage")
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"stage {kind}/{name} is registered twice: {existing} and {cls}")
        cls.kind, cls.name = kind, name
        _REGISTRY[kind][name] = cls
        return cls

    return decorate


def _load_builtin_stages() -> None:
    """Import every module of `kvpatch.stages` once, so their registrations run."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    package = importlib.import_module("kvpatch.stages")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def get_stage_class(kind: str, name: str) -> type[Stage]:
    """The class registered as `kind`/`name`; the error lists what is known."""
    _load_builtin_stages()
    if kind not in _REGISTRY:
        raise UnknownStageError(f"unknown stage kind {kind!r}; known kinds: {', '.join(sorted(_REGISTRY))}")
    implementations = _REGISTRY[kind]
    if name not in implementations:
        known = ", ".join(sorted(implementations)) or "(none registered yet)"
        raise UnknownStageError(f"unknown {kind} implementation {name!r}; known {kind} implementations: {known}")
    return implementations[name]


def available_stages() -> dict[str, list[str]]:
    """Registered implementation names by kind (kinds without any are listed empty)."""
    _load_builtin_stages()
    return {kind: sorted(impls) for kind, impls in sorted(_REGISTRY.items())}
