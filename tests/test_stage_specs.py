"""Stage declarations (`kvpatch/stage_specs/`) sit below the implementations: validating a config
imports neither torch nor transformers, an implementation must match its declaration, and a
plug-in without one still validates and builds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from transformers.cache_utils import DynamicLayer

import kvpatch
from kvpatch import registry
from kvpatch.params import Weight
from kvpatch.pipeline import Pipeline
from kvpatch.registry import Stage, StageParams, declare_stage, get_stage_class, get_stage_spec, register_stage

#: In a fresh interpreter: every bundled config through `load_config`, then through the
#: `kvpatch validate` entry point; prints which heavy modules that imported.
VALIDATE_ALL = """
import sys
from kvpatch.cli import main
from kvpatch.config import bundled_configs, load_config
names = sorted(bundled_configs())
for name in names:
    load_config(name)
code = main(["validate", *names])
print("VALIDATED", len(names), "CODE", code, "HEAVY", sorted({"torch", "transformers"} & set(sys.modules)))
"""


def test_validating_every_bundled_config_imports_neither_torch_nor_transformers() -> None:
    done = subprocess.run([sys.executable, "-c", VALIDATE_ALL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.splitlines()[-1].split()
    assert int(summary[1]) >= 10 and summary[2:5] == ["CODE", "0", "HEAVY"], done.stdout
    assert summary[5:] == ["[]"], done.stdout


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The registry as it is, restored after the test (stages registered here do not leak)."""
    # every built-in declaration and implementation loaded before the copy: an implementation first
    # imported inside the test would register only into the copy, and be lost to later tests
    for kind, names in kvpatch.available_stages().items():
        for name in names:
            registry.get_stage_class(kind, name)
    monkeypatch.setattr(registry, "_SPECS", {kind: dict(specs) for kind, specs in registry._SPECS.items()})
    monkeypatch.setattr(registry, "_CLASSES", {kind: dict(classes) for kind, classes in registry._CLASSES.items()})
    yield


class DeclaredParams(StageParams):
    size: int = 2


class OtherParams(StageParams):
    size: int = 1


def test_an_implementation_must_match_its_declaration(scratch_registry: None) -> None:
    class OtherModel(Stage):
        """Sets a Params model other than the declared one."""

        Params = OtherParams

    declare_stage("storage", "_test_mismatch", f"{__name__}:{OtherModel.__qualname__}", DeclaredParams)
    with pytest.raises(TypeError, match=r"OtherModel.Params is .*OtherParams, but storage/_test_mismatch is "
                                        r"declared with .*DeclaredParams"):
        register_stage("storage", "_test_mismatch")(OtherModel)

    class OtherFact(Stage):
        """Claims a fact that its declaration does not."""

        Params = DeclaredParams
        lossless = False

    declare_stage("storage", "_test_fact", f"{__name__}:{OtherFact.__qualname__}", DeclaredParams)
    with pytest.raises(TypeError, match="sets lossless = False, but storage/_test_fact is declared with lossless = True"):
        register_stage("storage", "_test_fact")(OtherFact)

    with pytest.raises(ValueError, match="declared twice"):
        declare_stage("storage", "_test_fact", f"{__name__}:Elsewhere", DeclaredParams)


def test_a_builtin_stage_needs_a_declaration(scratch_registry: None) -> None:
    with pytest.raises(TypeError, match="built-in stages are declared in kvpatch.stage_specs"):

        @register_stage("scorer", "_test_undeclared")
        class Undeclared(Stage):
            """Pretends to live in kvpatch/stages/ without a declaration."""

            __module__ = "kvpatch.stages.undeclared"


def test_a_plugin_without_declaration_validates_and_builds(scratch_registry: None) -> None:
    @register_stage("storage", "_test_plugin")
    class PluginStorage(Stage):
        """A plug-in in one class: nested Params and its facts as class attributes."""

        lossless = False
        requires = ("scorer",)
        builds_layers = True

        class Params(StageParams):
            eps: Weight = 0.5

        def make_layer(self, layout: Any) -> DynamicLayer:
            return DynamicLayer()

    spec = get_stage_spec("storage", "_test_plugin")
    assert (spec.Params, spec.lossless, spec.requires, spec.builds_layers) == (PluginStorage.Params, False, ("scorer",), True)
    assert "_test_plugin" in kvpatch.available_stages()["storage"]
    plugin = {"kind": "storage", "impl": "_test_plugin", "params": {"eps": 0.25}}
    with pytest.raises(kvpatch.ConfigError, match="storage/_test_plugin needs a scorer stage"):
        kvpatch.load_config({"name": "t", "fidelity": {"lossless": False}, "stages": [plugin]})
    stages = [plugin, {"kind": "scorer", "impl": "h2o"}]
    with pytest.raises(kvpatch.ConfigError, match="lossy: storage/_test_plugin"):
        kvpatch.load_config({"name": "t", "stages": stages})
    with pytest.raises(kvpatch.ConfigError, match="unknown key"):
        kvpatch.load_config({"name": "t", "fidelity": {"lossless": False},
                             "stages": [{**plugin, "params": {"no_such_param": 1}}, stages[1]]})
    config = kvpatch.load_config({"name": "t", "fidelity": {"lossless": False}, "stages": stages})
    stage = config.stages[0].build()
    assert isinstance(stage, PluginStorage) and stage.params.eps == 0.25 and stage.spec is spec
    assert isinstance(Pipeline(config).layer_builder, PluginStorage)


def test_a_plugin_subclass_of_a_builtin_keeps_its_facts(scratch_registry: None) -> None:
    kivi = get_stage_class("quantizer", "kivi")

    @register_stage("quantizer", "_test_kivi")
    class KiviVariant(kivi):
        """KIVI under another name."""

    spec = get_stage_spec("quantizer", "_test_kivi")
    assert spec.Params is kivi.Params and spec.lossless is False
    assert spec.implementation == f"{__name__}:{KiviVariant.__qualname__}"
