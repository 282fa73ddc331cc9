#!/usr/bin/env bash
# The CUDA-only paths of the faults and concurrency work (issue 21) on the GPU machine: pinned
# write-back buffers through host_memory, the offloader's side stream, the disk tier's lock, the
# forward guard `apply` installs; then the lossless patch's overhead (bench_overhead: patched vs
# unpatched in one run, eager and compiled), whose hooks now include the guard. Results in $OUT.
set -o pipefail
source tools/gpu/setup_env.sh
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_chunk_store.py tests/test_faults.py \
    tests/test_engine.py tests/test_tiers.py tests/test_reuse.py 2>&1 | tail -6
for mode in eager compile; do
    flag=""; [ "$mode" = compile ] && flag="--compile"
    timeout 200 python3 tools/bench_overhead.py --shape llama-1b --device cuda --dtype bf16 --prompt-len 512 \
        --decode-steps 64 --repeats 10 $flag --out "$OUT/overhead-h200-$mode.json" 2>&1 | tail -6
done
