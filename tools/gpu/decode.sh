#!/usr/bin/env bash
# Issue 16 on the GPU: CUDA-graph decode under plain generate equals eager decode (tests), then
# the decode benchmark (configs vs bandwidth floor vs HF StaticCache graph, one run). Results in $OUT.
set -o pipefail
source tools/gpu/setup_env.sh
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/test_decode_graphs.py tests/test_static_dense.py \
    tests/test_kernels.py -k "not interpreter" 2>&1 | tail -15
timeout 480 python3 tools/bench_decode.py --out "$OUT/decode-h200.json" "$@" 2>&1 | grep -v "it/s" | tail -30
