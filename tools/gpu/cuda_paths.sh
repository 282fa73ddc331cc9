#!/usr/bin/env bash
# The CUDA-only paths of the faults and concurrency work (issue 21) on the GPU machine: pinned
# write-back buffers through host_memory, the offloader's side stream, the disk tier's lock, the
# forward guard `apply` installs; then the lossless patch's overhead (bench_overhead: patched vs
# unpatched in one run, eager), whose hooks now include the guard; `kvpatch run` on CUDA. Results in $OUT.
set -o pipefail
source tools/gpu/setup_env.sh
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_chunk_store.py tests/test_faults.py \
    tests/test_engine.py tests/test_tiers.py tests/test_reuse.py 2>&1 | tail -6
timeout 200 python3 tools/bench_overhead.py --shape llama-1b --device cuda --dtype bf16 --prompt-len 512 \
    --decode-steps 64 --repeats 10 --out "$OUT/overhead-h200-eager.json" 2>&1 | grep -v "it/s" | tail -3
# the main job on the GPU, through the refactored CLI
timeout 240 python3 -m kvpatch.cli run --device cuda --config default --config kivi4 --config long_context --config prefix_reuse \
    --json "$OUT/run-h200.json" 2>&1 | grep -v -E "Loading weights|it/s" | tail -14
