"""The configuration space `kvpatch tune` searches, derived from the registry's declarations.

A `Family` is a pipeline shape (quantized storage, budget eviction, tiers, ...): a list of
`Slot`s, each a stage kind with the implementations it may take (None: every one the registry
declares for that kind) and the knobs searched per implementation. A knob's values come from the
stage's declared params: a `Literal` or `bool` field lists its own choices; a number field takes
a ladder (given, or the default x 1/4, 1/2, 1, 2) filtered through the params model, so the bounds
that `kvpatch validate` enforces are the bounds searched. Everything here is torch-free.
"""

from __future__ import annotations

import itertools
import json
import random
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..registry import available_stages, get_stage_spec

#: Multiples of a number field's default tried when a knob names no ladder.
DEFAULT_LADDER = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Knob:
    """One searched param of a stage: `path` is a field ("bits") or a nested one ("hot.ratio")."""

    path: str
    ladder: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Slot:
    """A stage kind in a family, the implementations it may take and what is searched for each."""

    kind: str
    impls: tuple[str, ...] | None = None  # None: every declared implementation of `kind`
    knobs: Mapping[str, tuple[Knob, ...]] = field(default_factory=dict)  # by implementation
    fixed: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # params set as given, by implementation

    def implementations(self) -> tuple[str, ...]:
        if self.impls is not None:
            return self.impls
        return tuple(name for name in available_stages()[self.kind] if not name.startswith("_"))


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a family and each slot's (kind, impl, params)."""

    family: str
    stages: tuple[tuple[str, str, str], ...]  # (kind, impl, params as sorted JSON): hashable

    @property
    def label(self) -> str:
        """`impl(knob=value, ...)` per stage, e.g. `kivi(bits=4,group_size=32)+quantized(...)`."""
        parts = []
        for _, impl, params in self.stages:
            flat = ",".join(f"{k}={v}" for k, v in _flatten(json.loads(params)).items())
            parts.append(f"{impl}({flat})" if flat else impl)
        return "+".join(parts)

    def lossless(self) -> bool:
        return all(get_stage_spec(kind, impl).is_lossless(get_stage_spec(kind, impl).Params.model_validate(
            json.loads(params))) for kind, impl, params in self.stages)

    def config(self, name: str, description: str = "", fidelity: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The candidate as a config dict (`kvpatch.load_config` accepts it)."""
        stages = []
        for kind, impl, params in self.stages:
            stage: dict[str, Any] = {"kind": kind, "impl": impl}
            if params != "{}":
                stage["params"] = json.loads(params)
            stages.append(stage)
        return {"name": name, "description": description or f"{self.family}: {self.label}", "stages": stages,
                "fidelity": dict(fidelity) if fidelity is not None else {"lossless": self.lossless()}}


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nest(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) \
            else value
    return merged


def _field(params: type[BaseModel], path: str) -> tuple[Any, Any]:
    """(annotation without None, default) of the field at `path` of a params model."""
    model: Any = params
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            raise ValueError(f"{params.__name__} has no param {'.'.join(parts[: i + 1])!r}; "
                             f"fields: {', '.join(model.model_fields)}")
        info = model.model_fields[part]
        annotation = info.annotation
        if i < len(parts) - 1:
            model = annotation  # a nested params model (e.g. TierBudget)
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation, info.default


def knob_values(params: type[BaseModel], knob: Knob, fixed: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of `knob` that the params model accepts (with the slot's `fixed` params)."""
    annotation, default = _field(params, knob.path)
    if knob.ladder:
        tried: Sequence[Any] = knob.ladder
    elif get_origin(annotation) is Literal:
        tried = get_args(annotation)
    elif annotation is bool:
        tried = (False, True)
    elif isinstance(default, (int, float)) and not isinstance(default, bool) and default:
        kind = type(default)
        tried = sorted({kind(default * m) if kind is float else max(1, round(default * m)) for m in DEFAULT_LADDER})
    else:
        raise ValueError(f"{params.__name__}.{knob.path} has no default to build a ladder from: give the knob one")
    valid = []
    for value in tried:
        try:
            params.model_validate(_merge(fixed, _nest(knob.path, value)))
        except ValidationError:
            continue
        valid.append(value)
    if not valid:
        raise ValueError(f"no value of {params.__name__}.{knob.path} in {list(tried)} is valid")
    return tuple(dict.fromkeys(valid))


def _slot_choices(slot: Slot) -> list[tuple[str, list[dict[str, Any]]]]:
    """(impl, every params dict of its knob grid) for each implementation of the slot."""
    choices = []
    for impl in slot.implementations():
        spec = get_stage_spec(slot.kind, impl)
        fixed = dict(slot.fixed.get(impl, {}))
        knobs = slot.knobs.get(impl, ())
        grids = [knob_values(spec.Params, knob, fixed) for knob in knobs]
        params_list = []
        for values in itertools.product(*grids):
            params = dict(fixed)
            for knob, value in zip(knobs, values, strict=True):
                params = _merge(params, _nest(knob.path, value))
            params_list.append(params)
        choices.append((impl, params_list))
    return choices


def family_grid(family: Family) -> dict[tuple[str, ...], list[Candidate]]:
    """Every candidate of a family, grouped by variant (the tuple of implementations chosen);
    combinations the config model refuses (cross-field rules) are left out."""
    from ..config import ConfigError, load_config

    per_slot = [_slot_choices(slot) for slot in family.slots]
    variants: dict[tuple[str, ...], list[Candidate]] = {}
    for picks in itertools.product(*per_slot):
        impls = tuple(impl for impl, _ in picks)
        for params in itertools.product(*(grid for _, grid in picks)):
            stages = tuple((slot.kind, impl, json.dumps(p, sort_keys=True))
                           for slot, impl, p in zip(family.slots, impls, params, strict=True))
            candidate = Candidate(family.name, stages)
            try:
                load_config(candidate.config("probe"))
            except ConfigError:
                continue
            variants.setdefault(impls, []).append(candidate)
    return variants


def sample(families: Sequence[Family], count: int, seed: int = 0,
           accept: Callable[[Candidate], bool] | None = None) -> list[Candidate]:
    """Up to `count` distinct candidates spread evenly: round-robin over families, within a
    family over its variants, each variant's grid in a seeded random order; `accept` (e.g.
    "fits this model's shapes") is asked only of candidates that would be picked."""
    rng = random.Random(seed)
    streams: list[Iterator[Candidate]] = []
    for family in families:
        orders = []
        for grid in family_grid(family).values():
            order = list(grid)
            rng.shuffle(order)
            orders.append(order)
        streams.append(_interleave(orders))
    picked: list[Candidate] = []
    for candidate in _interleave([list(s) for s in streams]):
        if len(picked) == count:
            break
        if accept is None or accept(candidate):
            picked.append(candidate)
    return picked


def _interleave(lists: Sequence[Sequence[Candidate]]) -> Iterator[Candidate]:
    """First items of each list, then the second ones, ... (shorter lists drop out)."""
    for row in itertools.zip_longest(*lists):
        yield from (item for item in row if item is not None)


def space_size(families: Sequence[Family]) -> int:
    return sum(len(grid) for family in families for grid in family_grid(family).values())


# -- the built-in space ---------------------------------------------------------------------------

_SINKS = Knob("sink_tokens", (0, 4, 16))

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("dense", "the full cache (the lossless anchor of the frontier)", (Slot("storage", ("dense",)),)),
    Family("quantized", "every declared quantizer under storage/quantized (codes + a full-precision window)", (
        Slot("quantizer", None, knobs={
            "kivi": (Knob("bits"), Knob("group_size")),
            "fp8": (Knob("format"), Knob("group_size", (None, 16, 32, 64))),
            "fibquant": (Knob("code_bits", (6, 8, 10)), Knob("block_dim", (2, 4, 8))),
        }),
        Slot("storage", ("quantized",), knobs={"quantized": (Knob("residual_length", (32, 64, 128, 256)), _SINKS)}),
    )),
    Family("evict", "every declared scorer under evictor/budget (tokens dropped to a share of those seen)", (
        Slot("scorer", None),
        Slot("evictor", ("budget",), knobs={"budget": (
            Knob("ratio", (0.125, 0.25, 0.5)), Knob("sink_tokens", (0, 4, 16)), Knob("recent_tokens", (0, 16, 64)))}),
    )),
    Family("tiered", "evictor/tiered: hot full precision, warm KIVI codes, cold offloaded (nothing dropped)", (
        Slot("scorer", ("h2o",)),
        Slot("quantizer", ("kivi",), knobs={"kivi": (Knob("bits"),)}),
        Slot("evictor", ("tiered",), knobs={"tiered": (Knob("hot.ratio", (0.03125, 0.0625, 0.125)),
                                                       Knob("warm.ratio", (0.2, 0.4, 0.6)))},
             fixed={"tiered": {"sink_tokens": 4, "recent_tokens": 32, "score_every": 16}}),
        Slot("offloader", ("cpu",)),
    )),
)}
