"""The `kvpatch` command line: one entry point, `--help` on every command (docs/cli.md).

Exit codes scripts can rely on: 0 ok; 1 a check failed (a config changed outputs it promised to
keep, a fidelity bound was broken, a snapshot was refused); 2 bad input (unknown config, model,
path or benchmark, bad arguments); 130 interrupted. `kvpatch bench` returns its benchmark's code.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .config import bundled_configs, load_config
from .errors import KVPatchError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES_HELP = "Exit codes: 0 ok, 1 a check failed or a snapshot was refused, 2 bad input, 130 interrupted."
#: Where `kvpatch bench` finds benchmarks: the repository's tools/ (not part of the wheel).
TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"


def _cmd_configs(args: argparse.Namespace) -> int:
    for name, path in bundled_configs().items():
        print(f"{name:<16} {load_config(path).description}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for source in args.configs:
        try:
            config = load_config(source)
            print(f"ok      {source}: {config.name} ({len(config.stages)} stages, lossless={config.fidelity.lossless})")
        except KVPatchError as err:
            print(f"INVALID {err}", file=sys.stderr)
            status = EXIT_BAD_INPUT
    return status


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .models import load_named
    from .runner import compare_configs, continuations, format_table

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


#: What `kvpatch run` compares by default: the lossless path, the compiled one, and a trade.
DEFAULT_RUN_CONFIGS = ("default", "compiled", "kivi4")
#: Characters of the shipped held-out text the default prompt takes: about 500 tokens, longer
#: than kivi4's full-precision window (128 + 4 sinks), so the memory-saving row saves memory.
DEFAULT_PROMPT_CHARS = 1700


def default_prompt() -> str:
    """The start of the reference model's held-out code, cut at a line end (the same on every machine)."""
    from .models import heldout_text

    text = heldout_text()[:DEFAULT_PROMPT_CHARS]
    return text[: text.rfind("\n") + 1]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpatch", description="KV-cache pipelines for HuggingFace causal LMs",
                                     epilog=EXIT_CODES_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("configs", help="list bundled configs with their descriptions",
                        description="Bundled configs (configs/*.yaml) with their descriptions.").set_defaults(
                            func=_cmd_configs)

    validate = commands.add_parser("validate", help="validate config files or bundled names",
                                   description="Exit 2 with one paragraph per invalid config.")
    validate.add_argument("configs", nargs="+", metavar="CONFIG")
    validate.set_defaults(func=_cmd_validate)

    run = commands.add_parser("run", help="generate with the unpatched model and each config; print a comparison table",
                              description="The main job: TTFT, decode speed, KV bytes and fidelity per config. "
                                          "Exit 1 if a lossless config changed the output.")
    run.add_argument("--model", default="kvpatch-ref", help="kvpatch-ref (default, shipped), tiny-llama, or a model dir")
    run.add_argument("--config", action="append",
                     help=f"config path or bundled name (repeatable; default: {', '.join(DEFAULT_RUN_CONFIGS)})")
    run.add_argument("--prompt", default=None, help="default: the first ~500 tokens of the shipped held-out code")
    run.add_argument("--max-new-tokens", type=_positive_int, default=48)
    run.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per row (the median is shown)")
    run.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    run.add_argument("--json", help="also write the rows as JSON here")
    run.set_defaults(func=_cmd_run)

    _add_eval(commands)
    _add_bench(commands)
    _add_snapshot(commands)
    return parser


def _add_eval(commands: argparse._SubParsersAction) -> None:
    """`kvpatch eval`: the fidelity harness (kvpatch.eval)."""
    from .eval.harness import add_eval_arguments, run_eval_cli

    evaluate = commands.add_parser("eval", help="fidelity harness: a config vs the unpatched model",
                                   description="Perplexity ratio, needle accuracy, logit and attention cosine, KV "
                                               "bytes (docs/fidelity.md). Exit 1 if a config breaks the bounds it "
                                               "declares.")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval_cli)


def benchmarks() -> dict[str, Path]:
    """Benchmark scripts by name: tools/bench_NAME.py."""
    if not TOOLS_DIR.is_dir():
        return {}
    return {p.stem.removeprefix("bench_"): p for p in sorted(TOOLS_DIR.glob("bench_*.py"))}


def _summary(script: Path) -> str:
    """The first line of a script's docstring."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _add_bench(commands: argparse._SubParsersAction) -> None:
    """`kvpatch bench NAME [ARGS...]`: runs tools/bench_NAME.py with ARGS (its own --help)."""
    bench = commands.add_parser(
        "bench", help="run a benchmark from tools/ (`kvpatch bench list`)",
        description="Runs tools/bench_NAME.py in a subprocess with the remaining arguments; `kvpatch bench NAME "
                    "--help` shows the benchmark's own options. Exit code: the benchmark's (2 for an unknown name).",
        epilog="benchmarks: " + (", ".join(benchmarks()) or "none found (tools/ is not installed with the wheel)"))
    bench.add_argument("name", metavar="NAME", help="a benchmark name, or `list`")
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the benchmark")
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    found = benchmarks()
    if args.name == "list":
        for name, script in found.items():
            print(f"{name:<18} {_summary(script)}")
        return EXIT_OK
    if args.name not in found:
        known = ", ".join(found) or f"none: no {TOOLS_DIR} (run from a source checkout)"
        print(f"kvpatch: error: unknown benchmark {args.name!r}; known: {known}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return subprocess.call([sys.executable, str(found[args.name]), *args.args])


def _add_snapshot(commands: argparse._SubParsersAction) -> None:
    """`kvpatch snapshot inspect|verify|gc|export|import` (kvpatch.snapshot)."""
    from .snapshot.cli import add_snapshot_commands

    add_snapshot_commands(commands.add_parser(
        "snapshot", help="inspect, verify, export, import or garbage-collect snapshots (caches, chunk stores)",
        description="Snapshot files of a request's cache or of a whole chunk store (docs/snapshot-format.md). "
                    "Exit codes: 0 ok, 1 verification failed or refused, 2 usage error."))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KVPatchError as err:
        print(f"kvpatch: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kvpatch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
