#!/usr/bin/env bash
# Issue 10 on the GPU machine: the hashing benchmark with the tensor index on CUDA (the Python
# index and dict parts run on the host CPU). Expects PYTHONPATH to import kvpatch; the JSON, the
# plot and the progress log land in $OUT.
set -euo pipefail
: "${OUT:?set OUT to the folder for results}"
PYTHON=$(command -v python || command -v python3)
"$PYTHON" tools/bench_hashing.py --device cuda --tag h100 --out-dir "$OUT" --plot "$OUT/hashing-h100.png" \
    2> "$OUT/bench-hashing-h100.log"
