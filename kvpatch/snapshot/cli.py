"""`kvpatch snapshot inspect | verify | gc | export`: snapshot files from the command line.

Exit codes as for every kvpatch command: 0 ok, 1 a snapshot failed verification or was refused,
2 usage error (missing path, unknown model or config). Exporting a live process's cache is the
API's job (`handle.export_snapshot`); `export` here runs a prefill on a named model to make one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from ..cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from ..errors import SnapshotError
from .api import read_metadata, verify_snapshot
from .directory import gc, list_snapshots, list_temp_files
from .format import SnapshotMetadata


def add_snapshot_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="snapshot_command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="print a snapshot's metadata, or list the snapshots of a directory",
                                  description="Reads the metadata only (its own checksum is checked); "
                                              "`verify` also checks the tensors.")
    inspect.add_argument("path", metavar="PATH", help="a .safetensors snapshot or a directory of them")
    inspect.add_argument("--json", action="store_true", help="print the metadata as JSON")
    inspect.set_defaults(func=_cmd_inspect)

    verify = commands.add_parser("verify", help="check a snapshot's integrity (and that it fits a model and config)",
                                 description="Exit 0 if every applicable check passes, 1 otherwise.")
    verify.add_argument("path", metavar="PATH")
    verify.add_argument("--model", metavar="NAME", help="also check the model fingerprint, shapes and tokenizer "
                                                        "(kvpatch-ref, tiny-llama, or a model dir)")
    verify.add_argument("--config", metavar="C", help="also check the pipeline config digest and layer kinds")
    verify.add_argument("--device", default="cpu")
    verify.set_defaults(func=_cmd_verify)

    collect = commands.add_parser("gc", help="remove abandoned temp files, and optionally old snapshots",
                                  description="Temp files of writers that died are always removed.")
    collect.add_argument("directory", metavar="DIR")
    policy = collect.add_mutually_exclusive_group()
    policy.add_argument("--keep", type=_non_negative(int), metavar="N", help="keep the N newest snapshots")
    policy.add_argument("--older-than", type=_non_negative(float), metavar="DAYS", help="remove snapshots older than this")
    collect.set_defaults(func=_cmd_gc)

    export = commands.add_parser("export", help="prefill a prompt on a named model and export its cache",
                                 description="The API (handle.export_snapshot) exports a live process's cache.")
    export.add_argument("--model", required=True, metavar="NAME", help="kvpatch-ref, tiny-llama, or a model dir")
    export.add_argument("--config", required=True, metavar="C", help="config path or bundled name")
    export.add_argument("--prompt", required=True, metavar="TEXT")
    export.add_argument("--out", required=True, metavar="PATH", help="the .safetensors file to write")
    export.add_argument("--device", default="cpu")
    export.set_defaults(func=_cmd_export)


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        return _inspect_directory(path)
    if not path.is_file():
        print(f"kvpatch: error: no snapshot at {path}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        metadata = read_metadata(path)
    except SnapshotError as err:
        print(f"UNREADABLE {err}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(metadata.model_dump(mode="json"), indent=2) if args.json else describe(path, metadata))
    return EXIT_OK


def _inspect_directory(directory: Path) -> int:
    status = EXIT_OK
    for path in list_snapshots(directory):
        try:
            m = read_metadata(path)
        except SnapshotError as err:
            print(f"UNREADABLE {err}")
            status = EXIT_FAILED
            continue
        print(f"{path.name}  {m.created}  {m.model.model_type}/{m.model.dtype}  config {m.pipeline.name}  "
              f"{m.batch_size}x{m.token_count} tokens  {path.stat().st_size:,} bytes")
    temps = list_temp_files(directory)
    if temps:
        print(f"({len(temps)} temp files of unfinished writes; `kvpatch snapshot gc` removes abandoned ones)")
    return status


def describe(path: Path, m: SnapshotMetadata) -> str:
    """A human-readable summary of a snapshot's metadata."""
    lines = [
        f"snapshot   {path} ({path.stat().st_size:,} bytes)",
        f"format     {m.format_version} ({m.kind}), kvpatch {m.kvpatch_version}, created {m.created}",
        f"model      {m.model.model_type} {m.model.dtype}, architecture {m.model.architecture[:16]}, "
        f"weights {m.model.weights[:16]}",
        f"pipeline   {m.pipeline.name} (digest {m.pipeline.digest[:16]})",
        f"tokenizer  {m.tokenizer[:16] if m.tokenizer else 'not recorded'}",
        f"tokens     {m.token_count} x batch {m.batch_size}, token ids {'stored' if m.token_ids else 'not stored'}",
        f"content    sha256 {m.content_sha256[:16]} (not verified here: `kvpatch snapshot verify`)",
    ]
    lines += [f"state      {key}: {', '.join(names)}" for key, names in m.stage_state.items()]
    lines.append("layer  kind       window  seen  sink  quantized  residual  tensors")
    for i, layer in enumerate(m.layers):
        lines.append(f"{i:>5}  {layer.kind:<9}  {layer.sliding_window or '-':>6}  {layer.seq_length:>4}  "
                     f"{layer.sink_tokens:>4}  {layer.quantized_tokens:>9}  {layer.residual_tokens:>8}  "
                     f"{', '.join(layer.tensors) or '-'}")
    return "\n".join(lines)


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..models import load_named

    path = Path(args.path)
    if not path.is_file():
        print(f"kvpatch: error: no snapshot at {path}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = load_config(args.config) if args.config else None
    model, tokenizer = load_named(args.model, args.device) if args.model else (None, None)
    try:
        metadata = verify_snapshot(path, model, config, tokenizer)
    except SnapshotError as err:
        print(f"FAILED {err}", file=sys.stderr)
        return EXIT_FAILED
    checked = ["integrity"] + (["model", "shapes", "tokenizer"] if model is not None else [])
    checked += ["config"] if config is not None else []
    print(f"ok {path}: {metadata.token_count} tokens, config {metadata.pipeline.name}; checked {', '.join(checked)}")
    return EXIT_OK


def _cmd_gc(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"kvpatch: error: {directory} is not a directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    older_than_s = args.older_than * 86400.0 if args.older_than is not None else None
    report = gc(directory, keep=args.keep, older_than_s=older_than_s)
    for path in report.removed_temp_files + report.removed_snapshots:
        print(f"removed {path}")
    print(f"{len(report.removed_snapshots)} snapshots and {len(report.removed_temp_files)} temp files removed")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from ..compat import cache_kwarg
    from ..models import load_named
    from ..patch import apply

    if not args.prompt:
        print("kvpatch: error: --prompt must not be empty", file=sys.stderr)
        return EXIT_BAD_INPUT
    model, tokenizer = load_named(args.model, args.device)
    handle = apply(model, args.config)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    cache = handle.new_cache()
    with torch.no_grad():
        model(input_ids=input_ids, **{cache_kwarg(model): cache})
    try:
        path = handle.export_snapshot(args.out, token_ids=input_ids, tokenizer=tokenizer)
    except SnapshotError as err:
        print(f"FAILED {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {path}: {input_ids.shape[1]} tokens, config {handle.config.name}, {path.stat().st_size:,} bytes")
    return EXIT_OK
