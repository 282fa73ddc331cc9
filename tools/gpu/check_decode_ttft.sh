#!/usr/bin/env bash
# One GPU check of decode and TTFT (issues 16, 18, 20): the decode benchmark at T=32K on the
# 1B shape with each graph config's kernel table, the plain-PyTorch measuring stick from
# ../shared/tools/gpu_min_decode.py when it is carried in .ref/, and the TTFT benchmark with the
# breakdown of a request that finds nothing stored. Results and a tarball of the tables in $OUT.
set -o pipefail
: "${OUT:?set OUT to the folder for results}"
source tools/gpu/setup_env.sh
tables=/tmp/tables; mkdir -p $tables
if [ -f .ref/gpu_min_decode.py ]; then
    timeout 60 python3 .ref/gpu_min_decode.py 2>&1 | tail -1 > "$OUT/min-decode-h200.json"
fi
timeout 280 python3 tools/bench_decode.py --batch 1 8 --context 32768 --configs default default_graphs kivi4_graphs kivi2_graphs --out "$OUT/decode-h200-check.json" \
    --kernels-dir $tables 2>&1 | grep -v "it/s" | tail -14
timeout 220 python3 tools/bench_ttft.py --device cuda --lengths 4096 8192 16384 --reuse 0 0.5 0.9 1.0 --repeats 5 \
    --miss-breakdown --profile-dir $tables --out "$OUT/ttft-h200-check.json" --plot "$OUT/ttft-h200-check.png" \
    2>&1 | grep -v "it/s" | tail -18
tar czf "$OUT/tables.tar.gz" -C $tables .
cat "$OUT/min-decode-h200.json" 2>/dev/null
