#!/usr/bin/env bash
# Issue 6 on the GPU machine: quantizer throughput (eager and compiled) on Llama-3-8B head
# shapes, encode overhead per decode step of a 1B-shaped Llama, and the end-to-end fidelity of
# the deployable compressed configs on kvpatch-ref. Results land in $OUT.
set -o pipefail
source tools/gpu/setup_env.sh
python3 tools/bench_compression.py --parts throughput overhead --device cuda --shape 1 8 32768 128 \
    --compile --out "$OUT/compression-h100-speed.json" 2>&1 | grep -v "it/s\]" | tail -5
python3 tools/bench_compression.py --parts e2e --device cuda --out "$OUT/compression-h100-e2e.json" \
    2>&1 | grep -v "it/s\]" | tail -5
