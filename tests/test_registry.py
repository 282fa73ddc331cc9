"""The stage registry. Parametrised over every registered stage, so new stages are tested for free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import kvpatch
from kvpatch.registry import STAGE_KINDS, Stage, StageParams, get_stage_class, get_stage_spec, register_stage

REGISTERED = [(kind, name) for kind, names in kvpatch.available_stages().items() for name in names]


def test_every_kind_is_listed() -> None:
    assert set(kvpatch.available_stages()) == set(STAGE_KINDS)


@pytest.mark.parametrize("kind, name", REGISTERED)
def test_registered_stage_is_well_formed(kind: str, name: str) -> None:
    cls = get_stage_class(kind, name)
    assert issubclass(cls, Stage) and cls.kind == kind and cls.name == name
    assert cls.spec is get_stage_spec(kind, name) and cls.Params is cls.spec.Params
    assert issubclass(cls.Params, StageParams)
    assert cls.__doc__, f"{kind}/{name} needs a docstring saying what it is for"
    # Stages that work with others (storage/quantized needs a quantizer) get the first registered one.
    helpers = [(k, kvpatch.available_stages()[k][0]) for k in cls.spec.requires]
    lossless = all(_lossless_by_default(*stage) for stage in [*helpers, (kind, name)])
    config = kvpatch.load_config({"name": "t", "fidelity": {"lossless": lossless, "min_logit_cosine": 0.0},
                                  "stages": [*({"kind": k, "impl": n} for k, n in helpers), {"kind": kind, "impl": name}]})
    stage = config.stages[-1].build()
    assert isinstance(stage, cls) and isinstance(stage.stats(), dict)
    assert stage.lossless == _lossless_by_default(kind, name) and stage.requires == cls.spec.requires


def _lossless_by_default(kind: str, name: str) -> bool:
    spec = get_stage_spec(kind, name)
    return spec.is_lossless(spec.Params())


@pytest.mark.parametrize("kind, name", REGISTERED)
def test_stage_params_reject_unknown_keys(kind: str, name: str) -> None:
    with pytest.raises(kvpatch.ConfigError, match="unknown key"):
        kvpatch.load_config({"name": "t", "stages": [{"kind": kind, "impl": name, "params": {"no_such_param": 1}}]})


def test_missing_required_stage_is_named() -> None:
    with pytest.raises(kvpatch.ConfigError, match="storage/quantized needs a quantizer stage"):
        kvpatch.load_config({"name": "t", "fidelity": {"lossless": False},
                             "stages": [{"kind": "storage", "impl": "quantized"}]})


def test_register_rejects_unknown_kind_and_duplicates() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        register_stage("sorter", "x")

    dense = get_stage_class("storage", "dense")
    with pytest.raises(ValueError, match="registered twice"):

        @register_stage("storage", "dense")
        class Impostor(Stage):
            """Not the real dense storage."""

    assert get_stage_class("storage", "dense") is dense


def test_lossless_config_refuses_lossy_stage() -> None:
    @register_stage("quantizer", "_test_lossy")
    class LossyForTest(Stage):
        """A lossy stage that exists only in this test."""

        lossless = False

    with pytest.raises(kvpatch.ConfigError, match="lossy: quantizer/_test_lossy"):
        kvpatch.load_config({"name": "t", "stages": [{"kind": "quantizer", "impl": "_test_lossy"}]})
    ok = kvpatch.load_config({"name": "t", "fidelity": {"lossless": False, "min_logit_cosine": 0.9},
                              "stages": [{"kind": "quantizer", "impl": "_test_lossy"}]})
    assert ok.stages_of("quantizer")[0].impl == "_test_lossy"


# -- strict, bounded params: every numeric field of every stage, found from its JSON schema -------

def _numeric_fields(schema: dict[str, Any], defs: dict[str, Any], path: tuple = ()) -> Iterator[tuple[tuple, dict, bool]]:
    """(field path, the numeric schema option, whether strings are also accepted) of every number
    in a params schema, nested models and lists included."""
    for name, prop in schema.get("properties", {}).items():
        options = prop.get("anyOf", [prop])
        takes_strings = any(o.get("type") == "string" for o in options)
        for option in options:
            if "$ref" in option:
                yield from _numeric_fields(defs[option["$ref"].split("/")[-1]], defs, (*path, name))
            elif option.get("type") == "array" and option.get("items", {}).get("type") in ("integer", "number"):
                yield (*path, name, 0), option["items"], takes_strings
            elif option.get("type") in ("integer", "number"):
                yield (*path, name), option, takes_strings
                break


def _bad_values(option: dict[str, Any], takes_strings: bool) -> list[Any]:
    """Values a field with this schema must refuse: `true`, a numeric string, just below and just
    above its bounds (-1 when it declares none: no stage param may be negative), NaN."""
    step = 1 if option["type"] == "integer" else 1e-3
    bad: list[Any] = [True] + ([] if takes_strings else ["1"])
    if "enum" in option:
        bad.append(min(option["enum"]) - 1)
    elif "exclusiveMinimum" in option:
        bad.append(option["exclusiveMinimum"])
    else:
        bad.append(option.get("minimum", 0) - step)
    if "exclusiveMaximum" in option:
        bad.append(option["exclusiveMaximum"])
    elif "maximum" in option:
        bad.append(option["maximum"] + step)
    if option["type"] == "number":
        bad.append(float("nan"))
    return bad


def _nest(path: tuple, value: Any) -> Any:
    for part in reversed(path):
        value = [value] if isinstance(part, int) else {part: value}
    return value


NUMERIC_FIELDS = [
    pytest.param(kind, name, path, bad, id=f"{kind}/{name}:{'.'.join(map(str, path))}={bad!r}")
    for kind, name in REGISTERED
    for schema in [get_stage_class(kind, name).Params.model_json_schema()]
    for path, option, strings in _numeric_fields(schema, schema.get("$defs", {}))
    for bad in _bad_values(option, strings)
]


def test_every_stage_kind_has_numeric_params_under_test() -> None:
    kinds = {kind for kind, *_ in (p.values for p in NUMERIC_FIELDS)}
    assert {"storage", "chunker", "index", "recompute", "store", "scorer", "evictor", "quantizer"} <= kinds


@pytest.mark.parametrize("kind, name, path, bad", NUMERIC_FIELDS)
def test_numeric_params_refuse_bools_strings_and_out_of_range(kind: str, name: str, path: tuple, bad: Any) -> None:
    params = get_stage_class(kind, name).Params
    with pytest.raises(ValidationError) as info:
        params.model_validate(_nest(path, bad))
    assert any(tuple(e["loc"][: len(path)]) == path for e in info.value.errors()), info.value.errors()


def test_true_as_a_size_is_refused_with_the_field_path() -> None:
    with pytest.raises(kvpatch.ConfigError) as info:
        kvpatch.load_config({"name": "t", "stages": [{"kind": "chunker", "impl": "fixed", "params": {"size": True}}]})
    assert "stages.0" in str(info.value) and "params.size" in str(info.value) and "valid integer" in str(info.value)


def test_token_ids_from_a_yaml_list_are_accepted_and_negative_ones_refused() -> None:
    chunker = get_stage_class("chunker", "fixed").Params
    assert chunker.model_validate({"boundary_token_ids": [10, 13]}).boundary_token_ids == (10, 13)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        chunker.model_validate({"boundary_token_ids": [10, -1]})


def test_offloader_mmap_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "not_a_dir"
    file.write_text("")
    offloader = get_stage_class("offloader", "cpu").Params
    with pytest.raises(ValidationError, match="expected a directory"):
        offloader.model_validate({"backing": "mmap", "mmap_dir": str(file)})
    assert offloader.model_validate({"backing": "mmap", "mmap_dir": str(tmp_path)}).mmap_dir == str(tmp_path)
