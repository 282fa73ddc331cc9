#!/usr/bin/env bash
# A short GPU re-check after a kernel or reuse change (about 3 minutes): the kernel and reuse
# tests on CUDA, decode at T=32K on the 1B shape (graph configs, with kernel tables), and TTFT at
# 4K-16K with the miss breakdown. Results in $OUT (decode-check.json, ttft-check.json,
# check-tables.tar.gz, check.log).
set -o pipefail
: "${OUT:?set OUT to the folder for results}"
source tools/gpu/setup_env.sh
tables=/tmp/check-tables; mkdir -p $tables
{
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_reuse_gpu.py 2>&1 | tail -4
timeout 120 python3 tools/bench_decode.py --batch 1 8 --context 32768 \
    --configs default_graphs kivi4_graphs kivi2_graphs --kernels-dir $tables \
    --out "$OUT/decode-check.json" 2>&1 | grep -v "it/s" | tail -9
timeout 100 python3 tools/bench_ttft.py --device cuda --lengths 4096 8192 16384 --reuse 0 0.5 0.9 1.0 --repeats 5 \
    --miss-breakdown --out "$OUT/ttft-check.json" 2>&1 | grep -v "it/s" | tail -16
} 2>&1 | tee "$OUT/check.log"
tar czf "$OUT/check-tables.tar.gz" -C $tables .
