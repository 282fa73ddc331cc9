#!/usr/bin/env bash
# Issue 19.3 on the GPU machine: the fidelity harness in bf16 on the GPU. (1) `kvpatch eval`,
# full preset, every bundled config, timed as a whole; (2) the bounds' sensitivity (default must
# pass, a perturbed "lossless" storage must be flagged); (3) the cache contract on the image's
# transformers version. Results land in $OUT; docs/fidelity.md quotes them.
set -o pipefail
source tools/gpu/setup_env.sh
start=$(date +%s)
timeout 400 python3 -m kvpatch.cli eval --preset full --device cuda --out "$OUT/eval" 2>&1 \
    | grep -v -E "it/s|row/s|s/row" | tee "$OUT/eval-full.log" | tail -30
echo "eval full, every bundled config: $(( $(date +%s) - start )) s (exit ${PIPESTATUS[0]})" | tee -a "$OUT/eval-full.log"
tar czf "$OUT/eval.tgz" -C "$OUT" eval && rm -rf "$OUT/eval"  # one file back instead of one per config
timeout 150 python3 tools/eval_sensitivity.py --device cuda --preset full --eps 1e-3 1e-2 3e-2 1e-1 \
    --out "$OUT/eval-sensitivity-h200.json" 2>&1 | grep -v -E "it/s|row/s|s/row" | tail -8
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cache_contract.py 2>&1 | tail -4
