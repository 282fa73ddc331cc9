"""`kvpatch snapshot inspect | verify | gc | export | import`: snapshot files from the command line
(the arguments are in parser.py).

Both kinds of snapshot: a request's cache (`request`) and a whole chunk store (`chunk_store`).
Exit codes as for every kvpatch command: 0 ok, 1 a snapshot failed verification or was refused,
2 usage error (missing path, unknown model or config). Exporting a live process's cache is the
API's job (`handle.export_snapshot`, `export_store`); `export` here runs prefills on a named
model to make one, and `import` loads one into a fresh process and continues from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..compat import cache_kwarg
from ..config import load_config
from ..engine import Engine
from ..models import load_named
from ..patch import apply
from ..errors import SnapshotError
from ..snapshot.api import read_metadata, verify_snapshot
from ..snapshot.chunk_store import KIND, export_store, import_store, read_store_snapshot
from ..files.folders import gc, list_snapshots, list_temp_files
from ..snapshot.format import AnyMetadata, ChunkStoreMetadata, SnapshotMetadata
from .exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK


def _missing(path: Path) -> bool:
    """True (after saying so) when there is no snapshot file at `path`."""
    if path.is_file():
        return False
    print(f"kvpatch: error: no snapshot at {path}", file=sys.stderr)
    return True


def inspect_command(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        return _inspect_directory(path)
    if _missing(path):
        return EXIT_BAD_INPUT
    try:
        metadata = read_metadata(path)
    except SnapshotError as err:
        print(f"UNREADABLE {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(metadata.model_dump(mode="json"), indent=2))
    else:
        print(describe_store(path, metadata) if isinstance(metadata, ChunkStoreMetadata) else describe(path, metadata))
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
        held = (f"{len(m.chunks)} chunks, {sum(c.tokens for c in m.chunks)} tokens" if isinstance(m, ChunkStoreMetadata)
                else f"{m.batch_size}x{m.token_count} tokens")
        print(f"{path.name}  {m.kind}  {m.created}  {m.model.model_type}/{m.model.dtype}  config {m.pipeline.name}  "
              f"{held}  {path.stat().st_size:,} bytes")
    temps = list_temp_files(directory)
    if temps:
        print(f"({len(temps)} temp files of unfinished writes; `kvpatch snapshot gc` removes abandoned ones)")
    return status


def _header_lines(path: Path, m: AnyMetadata) -> list[str]:
    return [
        f"snapshot   {path} ({path.stat().st_size:,} bytes)",
        f"format     {m.format_version} ({m.kind}), kvpatch {m.kvpatch_version}, created {m.created}",
        f"model      {m.model.model_type} {m.model.dtype}, architecture {m.model.architecture[:16]}, "
        f"weights {m.model.weights[:16]}",
        f"pipeline   {m.pipeline.name} (digest {m.pipeline.digest[:16]})",
        f"tokenizer  {m.tokenizer[:16] if m.tokenizer else 'not recorded'}",
    ]


def describe(path: Path, m: SnapshotMetadata) -> str:
    """A human-readable summary of a request snapshot's metadata."""
    lines = _header_lines(path, m) + [
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


def describe_store(path: Path, m: ChunkStoreMetadata) -> str:
    """A human-readable summary of a chunk-store snapshot: totals, then one line per chunk."""
    codecs = sorted({c.codec for c in m.chunks})
    lines = _header_lines(path, m) + [
        f"chunks     {len(m.chunks)} ({sum(c.tokens for c in m.chunks)} tokens), codecs {', '.join(codecs) or '-'}",
        f"content    sha256 {m.content_sha256[:16]} (not verified here: `kvpatch snapshot verify`)",
        "chunk  prefix hash       content hash      start  tokens  codec",
    ]
    lines += [f"{i:>5}  {c.prefix_hash[:16]:<16}  {c.content_hash[:16]:<16}  {c.start:>5}  {c.tokens:>6}  {c.codec}"
              for i, c in enumerate(m.chunks)]
    return "\n".join(lines)


def verify_command(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if _missing(path):
        return EXIT_BAD_INPUT
    config = load_config(args.config) if args.config else None
    model, tokenizer = load_named(args.model, args.device) if args.model else (None, None)
    try:
        if read_metadata(path).kind == KIND:
            metadata = read_store_snapshot(path, model, config, tokenizer=tokenizer)[0]
            held = f"{len(metadata.chunks)} chunks"
        else:
            metadata = verify_snapshot(path, model, config, tokenizer)
            held = f"{metadata.token_count} tokens"
    except SnapshotError as err:
        print(f"FAILED {err}", file=sys.stderr)
        return EXIT_FAILED
    checked = ["integrity"] + (["model", "shapes", "tokenizer"] if model is not None else [])
    checked += ["config"] if config is not None else []
    print(f"ok {path}: {held}, config {metadata.pipeline.name}; checked {', '.join(checked)}")
    return EXIT_OK


def gc_command(args: argparse.Namespace) -> int:
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


def export_command(args: argparse.Namespace) -> int:
    if args.chunk_store:
        return _export_store(args)
    if len(args.prompt) != 1 or not args.prompt[0]:
        print("kvpatch: error: a request snapshot needs exactly one non-empty --prompt", file=sys.stderr)
        return EXIT_BAD_INPUT
    model, tokenizer = load_named(args.model, args.device)
    handle = apply(model, args.config)
    input_ids = tokenizer(args.prompt[0], return_tensors="pt").input_ids.to(next(model.parameters()).device)
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


def _engine(args: argparse.Namespace) -> Engine:
    """An Engine (chunk reuse) for a named model and a reuse config."""
    model, tokenizer = load_named(args.model, args.device)
    return Engine(model, tokenizer, args.config)


def _export_store(args: argparse.Namespace) -> int:
    engine = _engine(args)
    for prompt in tqdm(args.prompt, desc="warm", unit="prompt", disable=len(args.prompt) < 2):
        engine.warm(prompt)
    store = engine.reuse.store
    path = export_store(args.out, store, engine.model, engine.handle.config, tokenizer=engine.tokenizer, progress=True)
    chunks = len(read_metadata(path, KIND).chunks)
    print(f"wrote {path}: {chunks} chunks, config {engine.handle.config.name}, {path.stat().st_size:,} bytes")
    return EXIT_OK


def import_command(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if _missing(path):
        return EXIT_BAD_INPUT
    try:
        kind = read_metadata(path).kind
    except SnapshotError as err:
        print(f"FAILED {err}", file=sys.stderr)
        return EXIT_FAILED
    return _import_store(args, path) if kind == KIND else _import_request(args, path)


def _import_request(args: argparse.Namespace, path: Path) -> int:
    model, tokenizer = load_named(args.model, args.device)
    handle = apply(model, args.config)
    try:
        cache = handle.import_snapshot(path, tokenizer=tokenizer)
    except SnapshotError as err:
        print(f"FAILED {err}", file=sys.stderr)
        return EXIT_FAILED
    rows = read_metadata(path, "request").token_ids
    loaded = f"loaded {path}: {cache.get_seq_length()} tokens"
    if rows is None or not args.prompt:
        print(loaded + (" (no token ids stored: cannot continue)" if rows is None else ""))
        return EXIT_OK
    # The cache holds K/V, not the last logits: continuing needs at least one new token.
    new_ids = tokenizer(args.prompt, add_special_tokens=False).input_ids
    ids = torch.tensor([row + new_ids for row in rows], device=next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=False, **{cache_kwarg(model): cache})
    print(f"{loaded}; continuation: {tokenizer.decode(out[0, ids.shape[1]:])!r}")
    return EXIT_OK


def _import_store(args: argparse.Namespace, path: Path) -> int:
    engine = _engine(args)
    store = engine.reuse.store
    try:
        count = import_store(path, store, engine.model, engine.handle.config, tokenizer=engine.tokenizer,
                             progress=True)
    except SnapshotError as err:
        print(f"FAILED {err}", file=sys.stderr)
        return EXIT_FAILED
    flushed = store.flush() if hasattr(store, "flush") else 0
    print(f"imported {count} chunks from {path}" + (f"; {flushed} written to the disk tier" if flushed else ""))
    if args.prompt:
        result = engine.generate(args.prompt, max_new_tokens=args.max_new_tokens)
        print(f"generate: kv_reuse_ratio {result.kv_reuse_ratio:.3f}, ttft {result.ttft_ms:.1f} ms, "
              f"output {result.output_text!r}")
    return EXIT_OK
