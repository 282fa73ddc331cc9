#!/usr/bin/env bash
# Issue 18 on the GPU: chunk reuse tests on CUDA (copy-stream write-back, worker admission), then
# TTFT 1K-32K x reuse 0-100% against full prefill and the floor, with the breakdown of a request
# that finds nothing stored (default / no write-back / whole, host ms per hook) and profiler tables
# of the unpatched prefill and a miss. JSON, plot, tables (tarball) and log in $OUT.
set -o pipefail
: "${OUT:?set OUT to the folder for results}"
source tools/gpu/setup_env.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_reuse_gpu.py tests/test_decode_graphs.py \
    tests/test_chunk_store.py 2>&1 | tail -6
tables=/tmp/tables; mkdir -p $tables
timeout 380 python3 tools/bench_ttft.py --device cuda --lengths 1024 4096 8192 16384 32768 \
    --reuse 0 0.25 0.5 0.75 0.9 1.0 --repeats 5 --miss-breakdown --profile-dir $tables \
    --out "$OUT/ttft-h200.json" --plot "$OUT/ttft-h200.png" 2>&1 | grep -v "it/s" | tee "$OUT/ttft.log" | tail -40
tar czf "$OUT/tables.tar.gz" -C $tables .
