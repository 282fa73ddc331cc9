"""`kvpatch configs`, `validate` and `bench`: answers that need no model.

`configs`, `validate` and `bench list` import neither torch nor transformers: `validate` checks
each stage's params and facts against its declaration (`kvpatch/stage_specs/`), never importing
the implementation (`tests/test_stage_specs.py` checks)."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

from ..config import bundled_configs, load_config, read_yaml
from ..errors import KVPatchError
from .exit_codes import EXIT_BAD_INPUT, EXIT_OK
from .parser import TOOLS_DIR, benchmarks


def configs(args: argparse.Namespace) -> int:
    """Each bundled config's description, read from its YAML without building its stages (the
    stage modules import torch; tests validate every bundled config)."""
    for name, path in bundled_configs().items():
        print(f"{name:<16} {read_yaml(path).get('description', '')}")
    return EXIT_OK


def validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for source in args.configs:
        try:
            config = load_config(source)
            count = len(config.stages)
            print(f"ok      {source}: {config.name} ({count} stage{'' if count == 1 else 's'}, "
                  f"lossless={config.fidelity.lossless})")
        except KVPatchError as err:
            print(f"INVALID {err}", file=sys.stderr)
            status = EXIT_BAD_INPUT
    return status


def bench(args: argparse.Namespace) -> int:
    found = benchmarks()
    if args.name == "list":
        for name, script in found.items():
            print(f"{name:<18} {summary(script)}")
        return EXIT_OK
    if args.name not in found:
        known = ", ".join(found) or f"none: no {TOOLS_DIR} (run from a source checkout)"
        print(f"kvpatch: error: unknown benchmark {args.name!r}; known: {known}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return subprocess.call([sys.executable, str(found[args.name]), *args.args])


def summary(script: Path) -> str:
    """The first sentence of a script's docstring (its first paragraph, lines joined, up to the
    first full stop that is not part of an ellipsis), so a summary wrapped over lines is never cut
    mid-sentence."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return re.split(r"(?<=[^.][.?!]) ", paragraph, maxsplit=1)[0]
