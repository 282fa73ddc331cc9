"""Config loading and validation: every way in works, every bad input gets a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvpatch
from kvpatch.config import bundled_configs
from kvpatch.errors import ConfigError, UnknownStageError

VALID = {"name": "t", "stages": [{"kind": "storage", "impl": "dense"}]}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_bundled_by_name_path_dict_and_object(tmp_path: Path) -> None:
    by_name = kvpatch.load_config("default")
    by_path = kvpatch.load_config(bundled_configs()["default"])
    by_repo_relative = kvpatch.load_config("configs/default.yaml")
    assert by_name.digest() == by_path.digest() == by_repo_relative.digest()
    assert kvpatch.load_config(by_name) is by_name
    from_dict = kvpatch.load_config(VALID)
    assert from_dict.stages[0].impl == "dense" and from_dict.source == "<dict>"
    assert by_path.source.endswith("default.yaml")


def test_digest_depends_on_content_only() -> None:
    a = kvpatch.load_config(VALID)
    b = kvpatch.load_config(dict(VALID))
    c = kvpatch.load_config({**VALID, "description": "other"})
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\nstages:\n  - kind: storage\n    impl: nope\n", ["stages.0", "unknown storage implementation 'nope'", "dense"]),
        ("name: x\nstages:\n  - kind: sorter\n    impl: dense\n", ["stages.0", "unknown stage kind 'sorter'", "storage"]),
        ("name: x\nstages:\n  - kind: storage\n    impl: dense\n    params: {trim_sliding_window: maybe}\n",
         ["stages.0", "params.trim_sliding_window", "boolean"]),
        ("name: x\nstages:\n  - kind: storage\n    impl: dense\n    params: {bits: 4}\n", ["params.bits", "unknown key"]),
        ("name: x\nkernels: {attention: cuda_magic}\n", ["kernels.attention", "'sdpa'", "cuda_magic"]),
        ("name: x\ncolour: blue\n", ["colour", "unknown key"]),
        ("description: no name\n", ["name", "required field is missing"]),
        ("name: x\ncompile: {enabled: yes please}\n", ["compile.enabled", "boolean"]),
        ("- just\n- a list\n", ["expected a mapping at the top level"]),
        ("name: x\nstages: [\n", ["not valid YAML", "line"]),
        ("name: x\nstages:\n  - {kind: storage, impl: dense}\n  - {kind: storage, impl: dense}\n", ["at most one storage stage"]),
        ("name: x\nfidelity: {max_ppl_ratio: 0.5}\n", ["fidelity.max_ppl_ratio", "greater than or equal to 1"]),
    ],
)
def test_bad_configs_name_file_field_and_expectation(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        kvpatch.load_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_missing_file_lists_bundled_configs() -> None:
    with pytest.raises(ConfigError, match="neither an existing file nor a bundled config name.*default"):
        kvpatch.load_config("configs/does_not_exist.yaml")


def test_wrong_source_type() -> None:
    with pytest.raises(ConfigError, match="cannot load a kvpatch config from int"):
        kvpatch.load_config(42)  # type: ignore[arg-type]


def test_unknown_stage_error_is_catchable_as_lookup_error() -> None:
    from kvpatch.registry import get_stage_class

    with pytest.raises(UnknownStageError) as info:
        get_stage_class("storage", "missing")
    assert isinstance(info.value, LookupError) and "dense" in str(info.value)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        kvpatch.load_config(path)


@pytest.mark.parametrize("name", sorted(bundled_configs()))
def test_every_bundled_config_validates_and_describes_itself(name: str) -> None:
    config = kvpatch.load_config(name)
    assert config.name == name, "a bundled config's name must match its file name"
    assert len(config.description) > 20
