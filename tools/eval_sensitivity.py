"""Can the harness's lossless bounds tell a correct config from a slightly wrong one?

Runs one reference (unpatched model + noise floor on a second attention backend), then evaluates
the lossless `default` config and a test-only storage that claims to be lossless but perturbs
every stored value by relative Gaussian noise of size eps. The bounds (kvpatch/eval/bounds.py)
must pass `default` and flag the perturbation; the report says from which eps on, in the dtype
and on the device given (exit 1 if default fails or the largest eps passes). Writes one JSON
with each row's deviations, the floor, the allowance and the wall times.

    python tools/eval_sensitivity.py --device cuda --preset full --out results/eval-sensitivity-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvpatch.eval import EvalSettings, evaluate, reference_run
from kvpatch.eval.bounds import lossless_allowance
from kvpatch.models import DTYPES, load_named
from kvpatch.testing import noisy_values_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kvpatch-ref")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--preset", choices=("quick", "full"), default="quick")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = EvalSettings.full() if args.preset == "full" else EvalSettings.quick()
    model, tokenizer = load_named(args.model, args.device, args.dtype)
    reference = reference_run(model, tokenizer, settings)
    rows = []
    for config in ["default", *(noisy_values_config(e) for e in args.eps)]:
        start = time.perf_counter()
        result = evaluate(model, tokenizer, config, reference=reference)
        violations = result.violations()
        rows.append({"config": result.config, "deviation": result.deviation.to_dict(), "violations": violations,
                     "passes": not violations, "wall_s": time.perf_counter() - start})
        print(f"{result.config:<14} {'ok' if not violations else 'VIOLATED'}  {result.deviation.to_dict()}")
    summary = {
        "model": args.model, "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "preset": args.preset,
        "floor_backend": reference.floor_backend, "floor": reference.floor.to_dict(),
        "allowance": lossless_allowance(reference.floor).to_dict(),
        "reference_wall_s": reference.wall_s, "rows": rows,
    }
    detected = [float(r["config"].split("-", 1)[1]) for r in rows[1:] if not r["passes"]]
    summary["smallest_eps_detected"] = min(detected) if detected else None
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    ok = rows[0]["passes"] and not rows[-1]["passes"]
    print(f"default {'passes' if rows[0]['passes'] else 'FAILS'}; smallest eps flagged: {summary['smallest_eps_detected']}",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
