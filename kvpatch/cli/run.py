"""`kvpatch run`: the main job, the unpatched model and each config side by side (runner.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..config import load_config
from ..models import heldout_text, load_named
from ..runner import compare_configs, continuations, format_table
from .exit_codes import EXIT_FAILED, EXIT_OK
from .parser import DEFAULT_RUN_CONFIGS

#: Characters of the shipped held-out text the default prompt takes: about 500 tokens, longer
#: than kivi4's full-precision window (128 + 4 sinks), so the memory-saving row saves memory.
DEFAULT_PROMPT_CHARS = 1700


def default_prompt() -> str:
    """The start of the reference model's held-out code, cut at a line end (the same on every machine)."""
    text = heldout_text()[:DEFAULT_PROMPT_CHARS]
    return text[: text.rfind("\n") + 1]


def run_command(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    configs = [load_config(source) for source in args.config or DEFAULT_RUN_CONFIGS]  # fail before any work
    model, tokenizer = load_named(args.model, args.device)
    device = next(model.parameters()).device
    prompt = args.prompt if args.prompt is not None else default_prompt()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    print(f"model {args.model} on {device}, prompt {input_ids.shape[1]} tokens, up to {args.max_new_tokens} new "
          f"tokens (stops at EOS), median of {args.repeats} runs after one warm-up run per row")
    rows = compare_configs(model, input_ids, configs, args.max_new_tokens, args.repeats, tokenizer.eos_token_id)
    print(format_table(rows))
    print("KV bytes: resident (what attention reads); KV frac: of the unpatched cache; token match and "
          "max |dlogit| (first step): against the unpatched run")
    print("\n".join(["", *continuations(rows, tokenizer.decode)]))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    changed = [r.config for r in rows[1:] if r.lossless and r.token_agreement < 1.0]
    if changed:
        print(f"lossless configs that changed the output: {', '.join(changed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
