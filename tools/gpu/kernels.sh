#!/usr/bin/env bash
# Issue 8 on the GPU machine: the kernel tests at real sizes, then tools/bench_kernels.py (copy
# bandwidth, knob sweep, decode-attention grid, encode, end to end, compile). Results land in $OUT.
set -o pipefail
source tools/gpu/setup_env.sh
python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-kernels-gpu.log" | tail -15
python3 tools/bench_kernels.py --out "$OUT/kernels-h100.json" "$@" 2>&1 | tee "$OUT/bench-kernels.log" | tail -60
