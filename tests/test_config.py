"""Config loading and validation: every way in works, every bad input gets a clear error."""

from __future__ import annotations

import time
import tracemalloc
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


# -- YAML from users: bounded work, bounded messages, nothing accepted silently ----------------

#: A message this long or longer repeats user input it should have cut.
SHORT = 600


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        kvpatch.load_config(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path: Path) -> None:
    levels = [f"l0: &l0 [{', '.join(['lol'] * 9)}]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values
    path = write(tmp_path, "\n".join(levels) + "\nname: *l9\n")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = refusal(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0 and peak < 16 * 2**20
    assert "aliases" in message and "line 2" in message and len(message) < SHORT


def test_alias_bomb_passed_as_a_dict_gets_a_short_message() -> None:
    bomb: list = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # shared references: 9**10 values if anything walked them all
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        kvpatch.load_config({"name": bomb})
    assert time.perf_counter() - started < 2.0
    assert "name: Input should be a valid string" in str(info.value) and len(str(info.value)) < SHORT


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ndescription: " + "[" * 100_000 + "]" * 100_000 + "\n")
    message = refusal(path)
    assert "nested deeper than" in message and "line 2" in message and len(message) < SHORT


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    assert "not UTF-8" in refusal(path)


@pytest.mark.parametrize("text, key, line", [
    ("name: a\nname: b\n", "'name'", 2),
    ("name: x\nstages:\n  - kind: storage\n    impl: dense\n    params: {trim_sliding_window: true, trim_sliding_window: false}\n",
     "'trim_sliding_window'", 5),
])
def test_duplicate_keys_are_refused_with_the_key(tmp_path: Path, text: str, key: str, line: int) -> None:
    message = refusal(write(tmp_path, text))
    assert f"duplicate key {key}" in message and f"line {line}" in message


def test_merge_keys_without_aliases_still_work(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ncompile: {<<: {enabled: false}, fullgraph: true}\n")
    assert kvpatch.load_config(path).compile.fullgraph is True


def test_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\n" + "# padding\n" * (2**20 // 10 + 1))
    assert "larger than" in refusal(path)


@pytest.mark.parametrize("text", [
    "name: x\ncompile: {enabled: " + "y" * 200_000 + "}\n",  # a huge value where a boolean belongs
    "name: x\n? " + "k" * 200_000 + "\n: 1\n",  # a huge unknown key (explicit: YAML caps implicit ones)
    "name: x\n" + "".join(f"unknown_{i}: 1\n" for i in range(5000)),  # thousands of problems
])
def test_messages_never_echo_unbounded_input(tmp_path: Path, text: str) -> None:
    assert len(refusal(write(tmp_path, text))) < 3000
