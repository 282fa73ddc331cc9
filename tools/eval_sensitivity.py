"""Can the harness's lossless bounds tell a correct config from a slightly wrong one?

Runs one reference (unpatched model + noise floor on a second attention backend), then evaluates
the lossless `default` config and a test-only storage that claims to be lossless but perturbs
every stored value by relative Gaussian noise of size eps. The bounds (kvpatch/eval/bounds.py)
must pass `default` and fail eps >= 1e-3, in the dtype and on the device given. Writes one JSON
with each row's deviations, the floor, the allowance and the wall times.

    python tools/eval_sensitivity.py --device cuda --preset full --out results/eval-sensitivity-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer

import kvpatch
from kvpatch.eval import EvalSettings, evaluate, reference_run
from kvpatch.eval.bounds import lossless_allowance
from kvpatch.models import DTYPES, load_named
from kvpatch.params import Weight


class _NoisyValueLayer(DynamicLayer):
    """Stores each value tensor with relative Gaussian noise `eps` (seeded: the same on every run)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.generator: torch.Generator | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.generator is None:
            self.generator = torch.Generator(value_states.device).manual_seed(0)
        noise = torch.randn(value_states.shape, generator=self.generator, device=value_states.device,
                            dtype=torch.float32)
        scale = value_states.float().pow(2).mean().sqrt()
        noisy = (value_states.float() + self.eps * scale * noise).to(value_states.dtype)
        return super().update(key_states, noisy, *args, **kwargs)


@kvpatch.register_stage("storage", "_eval_sensitivity_noisy")
class _NoisyStorage(kvpatch.Stage):
    """Claims to be lossless (so the lossless bounds apply) while perturbing the values."""

    builds_layers = True

    class Params(kvpatch.StageParams):
        eps: Weight = 1e-3

    def make_layer(self, layout) -> DynamicLayer:
        return _NoisyValueLayer(self.params.eps)


def noisy_config(eps: float) -> dict:
    return {"name": f"noisy-{eps:g}", "fidelity": {"lossless": True},
            "stages": [{"kind": "storage", "impl": "_eval_sensitivity_noisy", "params": {"eps": eps}}]}


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
    for config in ["default", *(noisy_config(e) for e in args.eps)]:
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
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    expected = [r["passes"] == (r["config"] == "default" or float(r["config"].split("-")[1]) < 1e-3) for r in rows]
    print("sensitivity as expected" if all(expected) else "UNEXPECTED: see rows", file=sys.stderr)
    return 0 if all(expected) else 1


if __name__ == "__main__":
    sys.exit(main())
