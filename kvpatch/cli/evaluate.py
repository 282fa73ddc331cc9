"""`kvpatch eval`: each config against one reference run of the fidelity harness (kvpatch.eval)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..config import bundled_configs, load_config
from ..eval.bounds import lossless_allowance
from ..eval.harness import EvalResult, Reference, evaluate, format_table, reference_run
from ..eval.plot import plot_fidelity_vs_memory
from ..eval.settings import EvalSettings
from ..models import load_named
from .exit_codes import EXIT_FAILED, EXIT_OK


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate each config against one reference run, print the table (and each config's
    seconds as it finishes), write JSON and the plot; exit 1 if any config breaks its bounds."""
    settings = EvalSettings.full() if args.preset == "full" else EvalSettings.quick()
    sources = args.config or list(bundled_configs())
    configs = [load_config(s) for s in sources]  # fail on a bad config before any model work
    model, tokenizer = load_named(args.model, args.device, args.dtype)
    reference = reference_run(model, tokenizer, settings)
    tqdm.write(f"reference (unpatched + floor): {reference.wall_s:.1f} s", file=sys.stderr)
    results, failed = [], False
    for config in configs:
        result = evaluate(model, tokenizer, config, reference=reference)
        tqdm.write(f"{config.name}: {result.wall_s:.1f} s", file=sys.stderr)
        violations = result.violations()
        failed |= bool(violations)
        for message in violations:
            print(f"{config.name}: {message}", file=sys.stderr)
        results.append(result)
    dtype = next(model.parameters()).dtype
    print(f"model {args.model} ({str(dtype).removeprefix('torch.')}, {next(model.parameters()).device}), "
          f"preset {args.preset}, reference {reference.wall_s:.1f} s")
    print(floor_line(reference))
    print(format_table(results))
    if args.out is not None:
        write_outputs(results, args.out, args.name or run_name(args.model, args.preset))
    return EXIT_FAILED if failed else EXIT_OK


def run_name(model: str, preset: str) -> str:
    """`<model>-<preset>`, the model being a folder's last part: the default plot name."""
    return f"{Path(model).name or 'model'}-{preset}"


def floor_line(reference: Reference) -> str:
    """The run's noise floor and what it allows a lossless config, in one line."""
    floor, allowed = reference.floor, lossless_allowance(reference.floor)

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2g}"

    return (f"noise floor (unpatched, {reference.floor_backend} vs the model's own backend): "
            f"logit {fmt(floor.logit)}, attn {fmt(floor.attention)}, ppl {fmt(floor.ppl)}, top1 {fmt(floor.top1)}; "
            f"lossless allows logit {fmt(allowed.logit)}, attn {fmt(allowed.attention)}, ppl {fmt(allowed.ppl)}, "
            f"top1 {fmt(allowed.top1)}")


def write_outputs(results: list[EvalResult], out: Path, name: str) -> Path:
    """eval-<config>.json per config and fidelity-<name>.png (one plot per run name); the plot's path."""
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        (out / f"eval-{result.config}.json").write_text(result.to_json())
    plot = out / f"fidelity-{name}.png"
    plot_fidelity_vs_memory([r.to_dict() for r in results], plot)
    return plot
