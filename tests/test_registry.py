"""The stage registry. Parametrised over every registered stage, so new stages are tested for free."""

from __future__ import annotations

import pytest

import kvpatch
from kvpatch.registry import STAGE_KINDS, Stage, StageParams, get_stage_class, register_stage

REGISTERED = [(kind, name) for kind, names in kvpatch.available_stages().items() for name in names]


def test_every_kind_is_listed() -> None:
    assert set(kvpatch.available_stages()) == set(STAGE_KINDS)


@pytest.mark.parametrize("kind, name", REGISTERED)
def test_registered_stage_is_well_formed(kind: str, name: str) -> None:
    cls = get_stage_class(kind, name)
    assert issubclass(cls, Stage) and cls.kind == kind and cls.name == name
    assert issubclass(cls.Params, StageParams)
    assert cls.__doc__, f"{kind}/{name} needs a docstring saying what it is for"
    # Stages that work with others (storage/quantized needs a quantizer) get the first registered one.
    helpers = [{"kind": k, "impl": kvpatch.available_stages()[k][0]} for k in cls.requires]
    lossless = cls.lossless and all(get_stage_class(h["kind"], h["impl"]).lossless for h in helpers)
    config = kvpatch.load_config({"name": "t", "fidelity": {"lossless": lossless, "min_logit_cosine": 0.0},
                                  "stages": [*helpers, {"kind": kind, "impl": name}]})
    stage = config.stages[-1].build()
    assert isinstance(stage, cls) and isinstance(stage.stats(), dict)


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
