#!/usr/bin/env bash
# Issue 3 on the GPU machine: exactness/compile tests on its transformers version, then the
# overhead benchmark (eager and compiled decoder). Results land in $OUT.
set -o pipefail
source tools/gpu/setup_env.sh
python3 -m pytest tests/test_patch_exactness.py tests/test_unsupported.py tests/test_config.py \
    tests/test_registry.py tests/test_compile.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu-image.log" | tail -25
for mode in "" "--compile"; do
    tag=${mode:+compiled}; tag=${tag:-eager}
    python3 tools/bench_overhead.py --shape llama-1b --device cuda --dtype bf16 --prompt-len 512 \
        --decode-steps 64 --repeats 10 $mode --out "$OUT/overhead-h100-llama1b-$tag.json" 2>&1 | grep -v "it/s"
done
