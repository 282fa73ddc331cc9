#!/usr/bin/env bash
# Issue 5 on the GPU machine: TTFT with chunk reuse vs full prefill, the floor and kvboost
# (carried as a wheel in .whl/, installed by setup_env.sh). JSON, plot and log land in $OUT.
set -euo pipefail
: "${OUT:?set OUT to the folder for results}"
PYTHON=$(command -v python || command -v python3)
"$PYTHON" tools/bench_ttft.py --device cuda --kvboost --kvboost-lengths 1024 4096 8192 --kvboost-reuse 0 0.5 0.9 --repeats 5 --out "$OUT/ttft-h100.json" --plot "$OUT/ttft-h100.png" \
    2>&1 | tee "$OUT/bench-ttft-h100.log"
