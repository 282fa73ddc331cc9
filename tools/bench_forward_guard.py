"""Cost of the forward guard `apply` installs (threads take turns per forward), per forward call.

Times a tiny module's forward with and without `ForwardGuard` in one run, alternating, and prints
the median difference in microseconds: the guard's own price, to set against a decode step.

    python tools/bench_forward_guard.py --calls 20000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvpatch.concurrency import ForwardGuard


def per_call_us(module: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            module(x)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    module, x = torch.nn.Linear(4, 4), torch.randn(1, 4)
    per_call_us(module, x, args.calls)  # warm-up
    plain, guarded = [], []
    for _ in range(args.repeats):
        plain.append(per_call_us(module, x, args.calls))
        guard = ForwardGuard(module)
        guarded.append(per_call_us(module, x, args.calls))
        guard.remove()
    cost = statistics.median(g - p for g, p in zip(guarded, plain))
    print(f"plain {statistics.median(plain):.2f} us, guarded {statistics.median(guarded):.2f} us per forward: "
          f"the guard costs {cost:.2f} us")


if __name__ == "__main__":
    main()
