"""`kvpatch tune`: search configs for a memory target and a quality floor (kvpatch.tune)."""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from .. import __version__
from ..data.needle import encode
from ..errors import KVPatchError
from ..eval.settings import EvalSettings
from ..models import load_named
from ..tune.frontier import markdown_table
from ..tune.objectives import Floor
from ..tune.outputs import points, write_outputs
from ..tune.search import NoConfigMeetsTarget, choose, top_settings, tune
from ..tune.space import FAMILIES, Family, space_size
from .exit_codes import EXIT_FAILED, EXIT_OK


def tune_command(args: argparse.Namespace) -> int:
    """Search, write --out, print the table; exit 1 when no config meets target and floor."""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    floor = make_floor(args)
    families = pick_families(args.families)
    text, data = read_data(args.text, args.prompts)
    top = top_settings(args.context)
    model, tokenizer = load_named(args.model, args.device, args.dtype)
    if text is not None:
        check_length(tokenizer, text, top, data)
    search = tune(model, tokenizer, families, args.memory, floor, candidates=args.candidates, eta=args.eta,
                  rungs=args.rungs, seed=args.seed, top=top, text=text)
    try:
        chosen, missed = choose(search, args.memory, floor), None
    except NoConfigMeetsTarget as err:
        chosen, missed = None, err
    parameter = next(model.parameters())
    meta = {
        "command": "kvpatch tune " + shlex.join(_argv(args)),
        "started": started, "model": args.model, "dtype": str(parameter.dtype).removeprefix("torch."),
        "device": str(parameter.device), "data": data, "families": [f.name for f in families],
        "space_size": space_size(families), "candidates": args.candidates, "eta": args.eta, "rungs": args.rungs,
        "seed": args.seed, "kvpatch_version": __version__, "torch_version": str(torch.__version__),
        "transformers_version": str(transformers.__version__),
    }
    paths = write_outputs(args.out, search, chosen, args.memory, floor, meta, args.name)
    print(markdown_table(points(search, args.memory, floor), chosen.candidate.label if chosen else None), end="")
    print(f"{len(search.trials[0])} candidates, {len(search.rungs)} rungs, {search.wall_s:.0f} s; "
          f"wrote {', '.join(str(p) for p in paths.values())}")
    if missed is not None:
        print(f"kvpatch tune: {missed}", file=sys.stderr)
        return EXIT_FAILED
    assert chosen is not None
    print(f"chosen: {chosen.candidate.label} -> {paths['yaml']}")
    return EXIT_OK


def _argv(args: argparse.Namespace) -> list[str]:
    """The arguments that decide the search, as a command line (for the outputs)."""
    memory = args.memory
    limit = f"{memory.fraction:g}" if memory.fraction is not None else str(memory.bytes)
    argv = ["--model", args.model, "--memory", limit, "--candidates", str(args.candidates),
            "--eta", str(args.eta), "--rungs", str(args.rungs), "--seed", str(args.seed), "--out", str(args.out)]
    for flag in ("max_ppl_ratio", "min_needle", "min_logit_cosine", "text", "prompts", "context", "families"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


def make_floor(args: argparse.Namespace) -> Floor:
    try:
        return Floor(args.max_ppl_ratio, args.min_needle, args.min_logit_cosine)
    except ValueError as err:
        raise KVPatchError(f"bad quality floor: {err} (--max-ppl-ratio, --min-needle, --min-logit-cosine)") from None


def pick_families(names: list[str] | None) -> list[Family]:
    unknown = [n for n in names or () if n not in FAMILIES]
    if unknown:
        raise KVPatchError(f"unknown --families {', '.join(unknown)}: expected some of {', '.join(FAMILIES)}")
    return [FAMILIES[n] for n in names] if names else list(FAMILIES.values())


def read_data(text_path: Path | None, prompts_path: Path | None) -> tuple[str | None, str]:
    """(evaluation text or None for the shipped held-out text, a description for the outputs).
    A prompts file is JSON Lines, one object per line with a "prompt" or "text" string; the
    prompts are joined by blank lines into one text."""
    if text_path is None and prompts_path is None:
        return None, "the reference model's shipped held-out text (kvpatch/models/kvpatch-ref/heldout.txt)"
    path = text_path or prompts_path
    assert path is not None
    try:
        raw = path.read_bytes()
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KVPatchError(f"{path} is not UTF-8 text (invalid byte at offset {err.start})") from None
    if prompts_path is not None:
        content = "\n\n".join(_prompts(path, content))
    if not content.strip():
        raise KVPatchError(f"{path} holds no text to evaluate on")
    kind = "prompts file" if prompts_path is not None else "text file"
    return content, f"{kind} {path} (sha256 {hashlib.sha256(raw).hexdigest()[:16]}, {len(raw):,} bytes)"


def _prompts(path: Path, content: str) -> list[str]:
    prompts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise KVPatchError(f"{path} line {number}: not JSON ({err.msg}); expected one object per line "
                               'with a "prompt" or "text" string') from None
        value = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise KVPatchError(f'{path} line {number}: expected an object with a "prompt" or "text" string')
        prompts.append(value)
    return prompts


def check_length(tokenizer: Any, text: str, settings: EvalSettings, data: str) -> None:
    """Refuse a text too short for the harness's budget, naming what it needs."""
    need = max(settings.decode_prompt_tokens + settings.decode_steps, settings.ppl_window + 1,
               *settings.needle_lengths)
    have = len(encode(tokenizer, text))
    if have < need:
        raise KVPatchError(f"{data} has {have:,} tokens; the search needs at least {need:,} (decode check "
                           f"{settings.decode_prompt_tokens}+{settings.decode_steps}, perplexity window "
                           f"{settings.ppl_window}, needle rows of {max(settings.needle_lengths)}): give more text "
                           "or a smaller --context")
