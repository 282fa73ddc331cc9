"""The one registry of pipeline stages.

A stage has a `kind` (what job it does in the pipeline), a `name` (which implementation), a typed
`Params` model (what a YAML may set), and facts that config validation needs: `lossless` (whether
it leaves the model's outputs unchanged; a bool, or a rule on its params), `requires` (stage kinds
it works with) and `builds_layers`. Those live in a `StageSpec`, apart from the implementation, so
that `load_config` and `kvpatch validate` check a config without importing torch.

Built-in stages are declared in `kvpatch/stage_specs/` (torch-free: the Params model, the facts,
and the implementation as "module:Class") and implemented in `kvpatch/stages/`, whose class sets
`Params` to the declared model and registers under `@register_stage(kind, name)`;
`get_stage_class` imports the implementation module on first use. Adding a built-in stage is a
declaration plus an implementation module; both are picked up by the parametrised tests.

A plug-in needs no declaration: a `@register_stage(kind, name)` class with a nested `Params` and
class attributes `lossless` / `requires` / `builds_layers` (defaults: True, (), False; a
subclass of a registered stage starts from its parent's) gets a spec made from the class when it
registers. A plug-in whose losslessness depends on its params declares itself with
`declare_stage` (a rule for `lossless`) before its class registers.

The pipeline finds stages by kind and calls what their kind implements (the built-ins are the
reference; tests/test_plugin_every_kind.py writes a plug-in of each): storage and evictors
`make_layer(layout)` (an evictor whose layers need attention events sets `needs_cache_events`);
chunker `spans(token_ids, segment_starts)`; hasher `make_hasher(namespace)` (a
`reuse.chunk_hash.ChunkHasher`-like object); index the `reuse.index.ChunkIndex` methods; matcher
`approximate` and `match(...)`; recompute `strategy` and optionally `recompute_positions(spans,
until)`; store the `reuse.chunk.ChunkStore` methods; offloader `to_host` / `to_device`. Scorers
and quantizers subclass `ScorerStage` / `QuantizerStage`, which the stages using them look for.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StageSpec:
    """What config validation knows of a stage, without importing its implementation."""

    kind: str
    name: str
    #: "module:Class" of the implementation; `get_stage_class` imports the module on first use.
    implementation: str
    Params: type[StageParams] = StageParams
    #: Whether the stage leaves outputs unchanged, or a rule that decides it from its params.
    lossless: bool | Callable[[Any], bool] = True
    #: Stage kinds this stage works with; a config that uses it without them is rejected.
    requires: tuple[str, ...] = ()
    #: Whether the stage builds the cache layers (`make_layer`). A config has at most one such
    #: stage besides the default `storage/dense`.
    builds_layers: bool = False

    def is_lossless(self, params: StageParams) -> bool:
        """Whether the stage, configured with `params`, leaves outputs unchanged."""
        return self.lossless if isinstance(self.lossless, bool) else self.lossless(params)


#: The facts a plug-in class may set as class attributes (`Stage` reads them through its spec).
_FACTS = ("lossless", "requires", "builds_layers")


class Stage:
    """Base class of every stage. Subclasses set `Params` and may override `stats`; the facts
    (`lossless`, `requires`, `builds_layers`) are read from the stage's spec."""

    kind: ClassVar[str]
    name: ClassVar[str]
    #: The stage's declaration, set by `register_stage`.
    spec: ClassVar[StageSpec]
    Params: ClassVar[type[StageParams]] = StageParams

    def __init__(self, params: StageParams) -> None:
        self.params = params

    @property
    def lossless(self) -> bool:
        """Whether this stage, with its params, leaves outputs unchanged."""
        return self.spec.is_lossless(self.params)

    @property
    def requires(self) -> tuple[str, ...]:
        return self.spec.requires

    @property
    def builds_layers(self) -> bool:
        return self.spec.builds_layers

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


_SPECS: dict[str, dict[str, StageSpec]] = {kind: {} for kind in STAGE_KINDS}
_CLASSES: dict[str, dict[str, type[Stage]]] = {kind: {} for kind in STAGE_KINDS}
_builtins_loaded = False


def _check_kind(kind: str, name: str) -> None:
    if kind not in STAGE_KINDS:
        raise ValueError(f"cannot register stage {name!r}: unknown kind {kind!r}; kinds are {sorted(STAGE_KINDS)}")


def declare_stage(kind: str, name: str, implementation: str, params: type[StageParams] = StageParams,
                  **facts: Any) -> StageSpec:
    """Declare stage `kind`/`name`: its Params model and facts (`lossless`, `requires`,
    `builds_layers`, as in `StageSpec`), implemented by the "module:Class" `implementation`."""
    _check_kind(kind, name)
    _load_builtin_specs()
    existing = _SPECS[kind].get(name)
    if existing is not None:
        raise ValueError(f"stage {kind}/{name} is declared twice: {existing.implementation} and {implementation}")
    spec = StageSpec(kind, name, implementation, params, **facts)
    _SPECS[kind][name] = spec
    return spec


def _own_facts(cls: type[Stage]) -> dict[str, Any]:
    """The facts `cls` sets as class attributes (not `Stage`'s read-through properties)."""
    return {fact: value for fact in _FACTS if not isinstance(value := getattr(cls, fact), property)}


def register_stage(kind: str, name: str) -> Callable[[S], S]:
    """Class decorator: register `cls` as implementation `name` of stage `kind`, under its
    declaration if it has one (its `Params` must be the declared model), else under a spec made
    from the class (a plug-in)."""
    _check_kind(kind, name)

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"{cls!r} must subclass kvpatch.registry.Stage")
        _load_builtin_specs()
        path = f"{cls.__module__}:{cls.__qualname__}"
        existing, spec = _CLASSES[kind].get(name), _SPECS[kind].get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"stage {kind}/{name} is registered twice: {existing} and {cls}")
        if existing is None and spec is not None and spec.implementation != path:
            raise ValueError(f"stage {kind}/{name} is registered twice: declared as {spec.implementation}, and {cls}")
        facts = _own_facts(cls)
        if spec is None:
            if cls.__module__.startswith("kvpatch.stages."):
                raise TypeError(f"{path}: built-in stages are declared in kvpatch.stage_specs "
                                f"(without a declaration, config validation never finds {kind}/{name})")
            inherited = getattr(cls, "spec", None) or StageSpec(kind, name, path)
            spec = dataclasses.replace(inherited, kind=kind, name=name, implementation=path, Params=cls.Params, **facts)
            _SPECS[kind][name] = spec
        if cls.Params is not spec.Params:
            raise TypeError(f"{path}.Params is {cls.Params.__module__}.{cls.Params.__qualname__}, but {kind}/{name} "
                            f"is declared with {spec.Params.__module__}.{spec.Params.__qualname__}")
        for fact, value in facts.items():
            if value != getattr(spec, fact):
                raise TypeError(f"{path} sets {fact} = {value!r}, but {kind}/{name} is declared with "
                                f"{fact} = {getattr(spec, fact)!r}; state it once, in the declaration")
        cls.kind, cls.name, cls.spec = kind, name, spec
        _CLASSES[kind][name] = cls
        return cls

    return decorate


def _load_builtin_specs() -> None:
    """Import every module of `kvpatch.stage_specs` once, so their declarations run (torch-free)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    package = importlib.import_module("kvpatch.stage_specs")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def get_stage_spec(kind: str, name: str) -> StageSpec:
    """The declaration of `kind`/`name` (no implementation is imported); the error lists what is known."""
    _load_builtin_specs()
    if kind not in _SPECS:
        raise UnknownStageError(f"unknown stage kind {kind!r}; known kinds: {', '.join(sorted(_SPECS))}")
    specs = _SPECS[kind]
    if name not in specs:
        known = ", ".join(sorted(specs)) or "(none registered yet)"
        raise UnknownStageError(f"unknown {kind} implementation {name!r}; known {kind} implementations: {known}")
    return specs[name]


def get_stage_class(kind: str, name: str) -> type[Stage]:
    """The class implementing `kind`/`name`, its module imported on first use."""
    spec = get_stage_spec(kind, name)
    if name not in _CLASSES[kind]:
        importlib.import_module(spec.implementation.partition(":")[0])
        if name not in _CLASSES[kind]:
            raise RuntimeError(f"{spec.implementation}, declared for {kind}/{name}, did not register it")
    return _CLASSES[kind][name]


def available_stages() -> dict[str, list[str]]:
    """Declared and registered implementation names by kind (kinds without any are listed empty)."""
    _load_builtin_specs()
    return {kind: sorted(specs) for kind, specs in sorted(_SPECS.items())}
