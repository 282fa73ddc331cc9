"""The `kvpatch` command line: one entry point, `--help` on every command (docs/cli.md).

Exit codes scripts can rely on: 0 ok; 1 a check failed (a config changed outputs it promised to
keep, a fidelity bound was broken, a snapshot was refused); 2 bad input (unknown config, model,
path or benchmark, bad arguments); 130 interrupted. `kvpatch bench` returns its benchmark's code.

Parsing, `--help`, `configs` and `validate` import neither torch nor transformers (an answer in
about a second): `parser.py` names each command's implementation as "module:function" of this
package, and `main` imports that module only when its command runs.
"""

from __future__ import annotations

import importlib
import os
import sys

from ..errors import KVPatchError
from .exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from .parser import build_parser

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, function = args.command_impl.split(":")
    try:
        return getattr(importlib.import_module(f".{module}", __name__), function)(args)
    except KVPatchError as err:
        print(f"kvpatch: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `kvpatch configs | head`: the reader stopped early, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except OSError as err:  # a path the user named cannot be read or written (permissions, missing folder)
        print(f"kvpatch: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kvpatch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
