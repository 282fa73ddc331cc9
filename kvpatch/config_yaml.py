"""Reading YAML that a user wrote: `yaml.safe_load` semantics, with the abuse cases refused.

A config file is input from whoever runs kvpatch, so reading it must stay cheap and its errors
short whatever the file holds:
- aliases (`*name`) are refused: a few lines of nested aliases (an "alias bomb") expand to
  billions of values as soon as anything walks them (validation, an error message);
- nesting deeper than `MAX_DEPTH` is refused (PyYAML's composer recurses: RecursionError);
- duplicate keys are refused (YAML keeps the last one silently);
- files over `MAX_BYTES` and files that are not UTF-8 are refused before parsing.
Every refusal is a ConfigError naming the file, with the line where YAML found the problem.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from .errors import ConfigError, echo

#: Largest config file read (the bundled ones are under 2 KiB).
MAX_BYTES = 1 << 20
#: Deepest nesting of mappings and lists (the bundled configs use 5).
MAX_DEPTH = 32

_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases, deep nesting and duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(None, None, "YAML aliases (*name) are not allowed in a kvpatch config; "
                                "write the value out instead", self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise ConstructorError(None, None, f"duplicate key {echo(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file with `ConfigLoader`; every failure is one ConfigError naming `path`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read kvpatch config {path}: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"kvpatch config {path} is larger than {MAX_BYTES // 1024} KiB; a config is a short YAML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"kvpatch config {path} is not UTF-8 text (invalid byte at offset {err.start}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"kvpatch config {path} is not valid YAML{where}: {problem[:200]}") from None
