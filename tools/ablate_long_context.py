"""Which part of `long_context` buys what: the config with one component changed at a time, each
through the long-context protocol beside the full cache (issue 17.3's ablation table).

Variants (each a copy of configs/long_context.yaml with one edit, written to OUT/configs/):
- `lc_base`: the config as shipped (H2O scores, hot 6.25% full precision, warm 60% KIVI-4, cold in
  host memory, promotion of cold blocks every 16 decode steps);
- `lc_no_promotion`: cold blocks never come back (`promote_every: null`);
- `lc_drop_cold`: what leaves warm is dropped instead of offloaded (`cold: {max_tokens: 0}`);
- `lc_snapkv`, `lc_tova`, `lc_key_norm`, `lc_streaming`: another scorer ranks the tiers;
- `lc_warm_kivi2`: warm codes at 2 bits instead of 4 (less resident memory).
The resident budget is the same for all but `lc_warm_kivi2`; the table shows each one's K/V bytes.

    python tools/ablate_long_context.py --out results/ablation-long-context-cpu --lengths 2048 --per-cell 2
    python tools/protocol_report.py results/ablation-long-context-cpu
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
Config = dict[str, Any]


def _stage(config: Config, kind: str) -> Config:
    return next(s for s in config["stages"] if s["kind"] == kind)


def _tier_params(config: Config) -> Config:
    return _stage(config, "evictor").setdefault("params", {})


def _scorer(impl: str) -> Callable[[Config], None]:
    def edit(config: Config) -> None:
        _stage(config, "scorer").update(impl=impl, params={})
    return edit


#: name -> (what it changes, the edit)
VARIANTS: dict[str, tuple[str, Callable[[Config], None]]] = {
    "lc_base": ("as shipped", lambda c: None),
    "lc_no_promotion": ("no promotion of cold blocks", lambda c: _tier_params(c).update(promote_every=None)),
    "lc_drop_cold": ("cold tier dropped, not offloaded", lambda c: _tier_params(c).update(cold={"max_tokens": 0})),
    "lc_snapkv": ("SnapKV scores the tiers", _scorer("snapkv")),
    "lc_tova": ("TOVA scores the tiers", _scorer("tova")),
    "lc_key_norm": ("key-norm scores the tiers", _scorer("key_norm")),
    "lc_streaming": ("recency only (streaming scorer)", _scorer("streaming")),
    "lc_warm_kivi2": ("warm codes at 2 bits", lambda c: _stage(c, "quantizer").setdefault("params", {}).update(bits=2)),
}


def variant_configs(base: Config, names: list[str]) -> dict[str, Config]:
    """Each named variant of `base` (a parsed long_context YAML), renamed and described."""
    out = {}
    for name in names:
        what, edit = VARIANTS[name]
        config = copy.deepcopy(base)
        edit(config)
        config["name"] = name
        config["description"] = f"long_context ablation: {what}"
        out[name] = config
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--per-cell", type=int, default=None)
    parser.add_argument("--model", default="kvpatch-ref")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    base = yaml.safe_load((ROOT / "configs" / "long_context.yaml").read_text())
    folder = args.out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "kvpatch.cli", "eval", "--preset", "protocol", "--model", args.model,
               "--device", args.device, "--out", str(args.out), "--name", "long-context-ablation"]
    for name, config in variant_configs(base, args.variants).items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command += ["--config", str(path)]
    if args.lengths:
        command += ["--lengths", *map(str, args.lengths)]
    if args.per_cell:
        command += ["--per-cell", str(args.per_cell)]
    print(" ".join(command), flush=True)
    status = subprocess.run(command, check=False).returncode
    report = [sys.executable, str(ROOT / "tools" / "protocol_report.py"), str(args.out), "--order", *args.variants]
    subprocess.run(report, check=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
