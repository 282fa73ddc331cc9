"""`kvpatch eval`: each config against one reference run of the fidelity harness (kvpatch.eval)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .. import __version__
from ..config import PipelineConfig, bundled_configs, load_config
from ..errors import KVPatchError
from ..files.atomic import write_text_atomic
from ..eval import export
from ..eval.bounds import lossless_allowance
from ..eval.harness import EvalResult, Reference, evaluate, format_table, reference_run
from ..eval.plot import plot_fidelity_vs_memory
from ..eval.protocol import format_protocol_table, plot_protocol
from ..eval.settings import EvalSettings
from ..models import load_named
from .exit_codes import EXIT_FAILED, EXIT_OK


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate each config against one reference run, print the table (and each config's
    seconds as it finishes), write the --format's files; exit 1 if any config breaks its bounds."""
    fmt = args.format
    if fmt != "kvpatch" and args.out is None:
        raise KVPatchError(f"--format {fmt} writes files and needs --out DIR (without --out, only the table is printed)")
    started, start = time.time(), time.perf_counter()
    sources = args.config or list(bundled_configs())
    configs = [load_config(s) for s in sources]  # fail on a bad config before any model work
    model, tokenizer = load_named(args.model, args.device, args.dtype)
    settings = preset_settings(args, model)
    reference = reference_run(model, tokenizer, settings)
    tqdm.write(f"reference (unpatched + floor): {reference.wall_s:.1f} s", file=sys.stderr)
    results, violations = [], {}
    for config in configs:
        result = evaluate(model, tokenizer, config, reference=reference)
        tqdm.write(f"{config.name}: {result.wall_s:.1f} s", file=sys.stderr)
        if fmt == "kvpatch" and args.out is not None:  # a long run keeps what it finished
            write_result(result, args.out)
        violations[config.name] = result.violations()
        for message in violations[config.name]:
            print(f"{config.name}: {message}", file=sys.stderr)
        results.append(result)
    parameter = next(model.parameters())
    dtype, device = str(parameter.dtype).removeprefix("torch."), str(parameter.device)
    print(f"model {args.model} ({dtype}, {device}), preset {args.preset}, reference {reference.wall_s:.1f} s")
    print(floor_line(reference))
    print(format_table(results))
    if settings.tasks:
        print()
        print(format_protocol_table([r.to_dict() for r in results]))
    if args.out is not None:
        if fmt == "kvpatch":
            write_outputs(results, args.out, args.name or run_name(args.model, args.preset))
        else:
            run = run_info(args, dtype, device, configs, violations, reference, started, time.perf_counter() - start)
            write_export(fmt, results, run, args.out)
    return EXIT_FAILED if any(violations.values()) else EXIT_OK


def preset_settings(args: argparse.Namespace, model: torch.nn.Module) -> EvalSettings:
    """The --preset's settings; the protocol's lengths follow the model's trained context
    (max_position_embeddings) unless --max-context or --lengths say otherwise."""
    if args.preset == "full":
        return EvalSettings.full()
    if args.preset != "protocol":
        return EvalSettings.quick()
    max_context = args.max_context or getattr(model.config, "max_position_embeddings", None)
    if not max_context:
        raise KVPatchError(f"--preset protocol: {args.model} declares no max_position_embeddings; pass --max-context N")
    try:
        return EvalSettings.protocol(int(max_context), args.per_cell, args.lengths)
    except ValueError as error:
        raise KVPatchError(f"--preset protocol: {error}") from error


def run_info(args: argparse.Namespace, dtype: str, device: str, configs: list[PipelineConfig],
             violations: dict[str, list[str]], reference: Reference, started: float,
             total_s: float) -> export.RunInfo:
    """What `kvpatch.eval.export` writes beside the results: model, versions, digests, bounds."""
    return export.RunInfo(
        model=args.model, dtype=dtype, device=device, preset=args.preset, kvpatch_version=__version__,
        transformers_version=str(transformers.__version__), torch_version=str(torch.__version__),
        config_digests={c.name: c.digest() for c in configs}, violations=violations,
        ppl_tokens=reference.ppl_ids.numel(), started=started, total_s=total_s)


def write_export(fmt: str, results: list[EvalResult], run: export.RunInfo, out: Path) -> list[Path]:
    """The kvpress folders or the lm-eval results file under `out` (kvpatch.eval.export)."""
    dicts = [r.to_dict() for r in results]
    if fmt == "kvpress":
        return export.write_kvpress(dicts, run, out)
    if fmt == "lm-eval":
        return [export.write_lm_eval(dicts, run, out)]
    raise KVPatchError(f"unknown --format {fmt!r}: expected one of {', '.join(export.FORMATS)}")


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


def write_result(result: EvalResult, out: Path) -> Path:
    """out/eval-<config>.json, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eval-{result.config}.json"
    write_text_atomic(path, result.to_json())
    return path


def write_outputs(results: list[EvalResult], out: Path, name: str) -> Path:
    """eval-<config>.json per config (written atomically) and fidelity-<name>.png (one plot per run
    name), and with the protocol's tasks protocol-<name>.png (the heatmap); the fidelity plot's path."""
    for result in results:
        write_result(result, out)
    dicts = [r.to_dict() for r in results]
    plot = out / f"fidelity-{name}.png"
    plot_fidelity_vs_memory(dicts, plot)
    if any(r.tasks_patched for r in results):
        plot_protocol(dicts, out / f"protocol-{name}.png")
    return plot
