"""Every `kvpatch` command's arguments and help, and which function runs it.

Nothing here imports torch: each command names its implementation as "module:function" of the
`kvpatch.cli` package (`command_impl`), imported by `main` when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .exit_codes import EXIT_CODES_HELP

#: Where `kvpatch bench` finds benchmarks: the repository's tools/ (not part of the wheel).
TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"
#: What `kvpatch run` compares by default: the lossless path, the compiled one, and a trade.
DEFAULT_RUN_CONFIGS = ("default", "compiled", "kivi4")
#: `--dtype` names (kvpatch.models.folder.DTYPES maps them to torch dtypes; a test keeps them equal).
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
#: `kvpatch eval --format` names (kvpatch.eval.export.FORMATS; a test keeps them equal).
EVAL_FORMATS = ("kvpatch", "kvpress", "lm-eval")
#: `kvpatch tune --families` names (kvpatch.tune.space.FAMILIES; a test keeps them equal).
TUNE_FAMILIES = ("dense", "quantized", "evict", "tiered")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpatch", description="KV-cache pipelines for HuggingFace causal LMs",
                                     epilog=EXIT_CODES_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("configs", help="list bundled configs with their descriptions",
                        description="Bundled configs (configs/*.yaml) with their descriptions.").set_defaults(
                            command_impl="listing:configs")
    validate = commands.add_parser("validate", help="validate config files or bundled names",
                                   description="Exit 2 with one paragraph per invalid config.")
    validate.add_argument("configs", nargs="+", metavar="CONFIG")
    validate.set_defaults(command_impl="listing:validate")
    _add_run(commands)
    _add_eval(commands)
    _add_tune(commands)
    _add_bench(commands)
    _add_snapshot(commands)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value

    return parse


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="generate with the unpatched model and each config; print a comparison table",
                              description="The main job: TTFT, decode speed, KV bytes and fidelity per config. "
                                          "Exit 1 if a lossless config changed the output.")
    run.add_argument("--model", default="kvpatch-ref", help="kvpatch-ref (default, shipped), tiny-llama, or a model dir")
    run.add_argument("--config", action="append",
                     help=f"config path or bundled name (repeatable; default: {', '.join(DEFAULT_RUN_CONFIGS)})")
    run.add_argument("--prompt", default=None, help="default: the first ~500 tokens of the shipped held-out code")
    run.add_argument("--max-new-tokens", type=positive_int, default=48)
    run.add_argument("--repeats", type=positive_int, default=3, help="timed runs per row (the median is shown)")
    run.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    run.add_argument("--json", help="also write the rows as JSON here")
    run.set_defaults(command_impl="run:run_command")


def _add_eval(commands: argparse._SubParsersAction) -> None:
    """`kvpatch eval`: the fidelity harness (kvpatch.eval)."""
    evaluate = commands.add_parser("eval", help="fidelity harness: a config vs the unpatched model",
                                   description="Perplexity ratio, needle accuracy, logit and attention cosine, KV "
                                               "bytes (docs/fidelity.md). Exit 1 if a config breaks the bounds it "
                                               "declares.")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(command_impl="evaluate:eval_command")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvpatch eval`."""
    parser.add_argument("--model", default="kvpatch-ref",
                        help="kvpatch-ref (default), tiny-llama, or any local model folder transformers loads")
    parser.add_argument("--config", action="append",
                        help="config path or bundled name (repeatable; default: every bundled config)")
    parser.add_argument("--preset", choices=("quick", "full", "protocol"), default="quick",
                        help="quick (default), full, or protocol: the long-context protocol, every task at "
                             "1/8-1/1 of the model's trained context x 5 depths (docs/long-context.md)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="protocol: the trained context to derive lengths from (default: the model's "
                             "max_position_embeddings)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="protocol: these context lengths instead of 1/8, 1/4, 1/2, 1 of --max-context")
    parser.add_argument("--per-cell", type=int, default=10, help="protocol: rows per task, length and depth")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results here (what: --format)")
    parser.add_argument("--format", choices=EVAL_FORMATS, default="kvpatch",
                        help="what --out gets: kvpatch (default): eval-<config>.json per config and "
                             "fidelity-<name>.png; kvpress: one <dataset>__<preset>__<model>__<config>__<ratio> "
                             "folder per config with metrics.json and config.yaml; lm-eval: "
                             "<model>/results_<time>.json as lm-evaluation-harness writes it (docs/fidelity.md)")
    parser.add_argument("--name", default=None,
                        help="names this run's plot (default: <model>-<preset>), so runs into one --out keep theirs")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="model dtype (default: float32 on CPU, bfloat16 on accelerators; auto: the folder's)")


def benchmarks() -> dict[str, Path]:
    """Benchmark scripts by name: tools/bench_NAME.py."""
    if not TOOLS_DIR.is_dir():
        return {}
    return {p.stem.removeprefix("bench_"): p for p in sorted(TOOLS_DIR.glob("bench_*.py"))}


def _add_bench(commands: argparse._SubParsersAction) -> None:
    """`kvpatch bench NAME [ARGS...]`: runs tools/bench_NAME.py with ARGS (its own --help)."""
    bench = commands.add_parser(
        "bench", help="run a benchmark from tools/ (`kvpatch bench list`)",
        description="Runs tools/bench_NAME.py in a subprocess with the remaining arguments; `kvpatch bench NAME "
                    "--help` shows the benchmark's own options. Exit code: the benchmark's (2 for an unknown name).",
        epilog="benchmarks: " + (", ".join(benchmarks()) or "none found (tools/ is not installed with the wheel)"))
    bench.add_argument("name", metavar="NAME", help="a benchmark name, or `list`")
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the benchmark")
    bench.set_defaults(command_impl="listing:bench")


def _add_snapshot(commands: argparse._SubParsersAction) -> None:
    """`kvpatch snapshot inspect|verify|gc|export|import` (kvpatch.snapshot)."""
    snapshot = commands.add_parser(
        "snapshot", help="inspect, verify, export, import or garbage-collect snapshots (caches, chunk stores)",
        description="Snapshot files of a request's cache or of a whole chunk store (docs/snapshot-format.md). "
                    "Exit codes: 0 ok, 1 verification failed or refused, 2 usage error.")
    commands = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="print a snapshot's metadata, or list the snapshots of a directory",
                                  description="Reads the metadata only (its own checksum is checked); "
                                              "`verify` also checks the tensors.")
    inspect.add_argument("path", metavar="PATH", help="a .safetensors snapshot or a directory of them")
    inspect.add_argument("--json", action="store_true", help="print the metadata as JSON")
    inspect.set_defaults(command_impl="snapshot:inspect_command")

    verify = commands.add_parser("verify", help="check a snapshot's integrity (and that it fits a model and config)",
                                 description="Exit 0 if every applicable check passes, 1 otherwise.")
    verify.add_argument("path", metavar="PATH")
    verify.add_argument("--model", metavar="NAME", help="also check the model fingerprint, shapes and tokenizer "
                                                        "(kvpatch-ref, tiny-llama, or a model dir)")
    verify.add_argument("--config", metavar="C", help="also check the pipeline config digest and layer kinds")
    verify.add_argument("--device", default="cpu")
    verify.set_defaults(command_impl="snapshot:verify_command")

    collect = commands.add_parser("gc", help="remove abandoned temp files, and optionally old snapshots",
                                  description="Temp files of writers that died are always removed.")
    collect.add_argument("directory", metavar="DIR")
    policy = collect.add_mutually_exclusive_group()
    policy.add_argument("--keep", type=_non_negative(int), metavar="N", help="keep the N newest snapshots")
    policy.add_argument("--older-than", type=_non_negative(float), metavar="DAYS", help="remove snapshots older than this")
    collect.set_defaults(command_impl="snapshot:gc_command")

    export = commands.add_parser("export", help="prefill prompts on a named model and export its cache or chunk store",
                                 description="Request snapshot: one --prompt, its cache after prefill. With "
                                             "--chunk-store: the chunks of a reuse config's store after warming "
                                             "each --prompt (none: what its disk tier holds). The API "
                                             "(handle.export_snapshot, snapshot.export_store) exports a live process.")
    export.add_argument("--model", required=True, metavar="NAME", help="kvpatch-ref, tiny-llama, or a model dir")
    export.add_argument("--config", required=True, metavar="C", help="config path or bundled name")
    export.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="prompt to prefill (repeatable with --chunk-store)")
    export.add_argument("--chunk-store", action="store_true",
                        help="export the config's chunk store (a reuse config, e.g. prefix_reuse)")
    export.add_argument("--out", required=True, metavar="PATH", help="the .safetensors file to write")
    export.add_argument("--device", default="cpu")
    export.set_defaults(command_impl="snapshot:export_command")

    load = commands.add_parser("import", help="load a snapshot into a fresh process and continue from it",
                               description="A request snapshot: verified and loaded into a cache; with --prompt, "
                                           "generation continues after its tokens and that text. A chunk-store "
                                           "snapshot: verified and put into the config's store (persisted if the "
                                           "store has a disk or Redis tier); with --prompt, a generation shows the "
                                           "reuse it gets. Exit 1 if the snapshot is refused.")
    load.add_argument("path", metavar="PATH")
    load.add_argument("--model", required=True, metavar="NAME", help="kvpatch-ref, tiny-llama, or a model dir")
    load.add_argument("--config", required=True, metavar="C", help="config path or bundled name")
    load.add_argument("--prompt", metavar="TEXT", help="request: text to append to the cached tokens, then generate "
                                                       "greedily; chunk store: a prompt to generate from after importing")
    load.add_argument("--max-new-tokens", type=_non_negative(int), default=16, metavar="N")
    load.add_argument("--device", default="cpu")
    load.set_defaults(command_impl="snapshot:import_command")


def _memory_target(text: str) -> object:
    """argparse type of `kvpatch tune --memory` (kvpatch.tune.objectives.parse_memory, torch-free)."""
    from ..tune.objectives import parse_memory

    try:
        return parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_tune(commands: argparse._SubParsersAction) -> None:
    """`kvpatch tune`: search the registry's config space for a memory target and a quality floor."""
    tune = commands.add_parser(
        "tune", help="search configs for a memory target and a quality floor (successive halving)",
        description="Samples configs from the registry's stages (quantizers and bits, group size, residual window, "
                    "sinks, scorers, eviction budget, tier ratios), measures them with the fidelity harness on the "
                    "given text, most promising third again with more perplexity tokens and needle rows (successive "
                    "halving), and writes the memory/quality frontier (tune.json, frontier.md, frontier.png) and the "
                    "best config that meets the target and the floor (chosen.yaml) into --out (docs/tune.md). "
                    "Exit 1 if no searched config meets both (the closest ones are listed).")
    tune.add_argument("--memory", required=True, type=_memory_target, metavar="TARGET",
                      help="resident K/V limit: a fraction of the full cache (0.3, 30%%) or a size (3000000, 3MB, "
                           "2.5MiB), measured by the harness after its decode check")
    tune.add_argument("--max-ppl-ratio", type=float, default=None, metavar="R",
                      help="floor: perplexity ratio patched/unpatched at most R (>= 1)")
    tune.add_argument("--min-needle", type=float, default=None, metavar="A",
                      help="floor: patched needle accuracy at least A (0-1)")
    tune.add_argument("--min-logit-cosine", type=float, default=None, metavar="C",
                      help="floor: worst decode step's logit cosine at least C (0-1)")
    tune.add_argument("--model", default="kvpatch-ref",
                      help="kvpatch-ref (default), tiny-llama, or any local model folder transformers loads")
    data = tune.add_mutually_exclusive_group()
    data.add_argument("--text", type=Path, default=None, metavar="FILE",
                      help="UTF-8 text to evaluate on (default: the shipped model's held-out text)")
    data.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                      help='JSON Lines, one {"prompt": ...} (or "text") per line, joined into one text')
    tune.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the outputs are written")
    tune.add_argument("--families", nargs="+", default=None, metavar="F",
                      help=f"config families to search: {', '.join(TUNE_FAMILIES)} (default: all)")
    tune.add_argument("--candidates", type=positive_int, default=24, help="configs sampled for the first rung")
    tune.add_argument("--rungs", type=positive_int, default=3, help="successive-halving rungs (budgets)")
    tune.add_argument("--eta", type=_at_least(2), default=3,
                      help="keep 1/eta of each rung; each rung has eta x the previous budget (>= 2)")
    tune.add_argument("--context", type=positive_int, default=None, metavar="TOKENS",
                      help="decode-check prompt (where memory is measured) and needle row length (default 384 / 512)")
    tune.add_argument("--seed", type=_non_negative(int), default=0, help="sampling seed")
    tune.add_argument("--name", default="tuned", help="the chosen config's name")
    tune.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    tune.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                      help="model dtype (default: float32 on CPU, bfloat16 on accelerators)")
    tune.set_defaults(command_impl="tune:tune_command")
