#!/usr/bin/env bash
# Issue 7 on the GPU machine: the three-tier `long_context` config against the full cache and
# `fixed_budget` on a random-init Llama-3-8B-shaped model (bf16) up to 128K tokens (resident
# and host K/V bytes, peak GPU memory, decode ms/token), then the fidelity of every method at
# 50 / 25 / 12.5% budgets on kvpatch-ref with the full protocol. Results land in $OUT.
#   device: bash tools/gpu/long_context.sh            (two parts, ~10 min each: PART=speed|fidelity)
#   speed only some configs / lengths: CONFIGS="default long_context" CONTEXTS="8192 32768" PART=speed ...
set -o pipefail
source tools/gpu/setup_env.sh
PART=${PART:-speed}
if [ "$PART" = speed ]; then
    python3 tools/bench_long_context.py --device cuda --configs ${CONFIGS:-default long_context fixed_budget} \
        --contexts ${CONTEXTS:-8192 32768 131072} --decode-steps 12 --out "$OUT/${NAME:-long-context-h100-tiers}.json" \
        2>&1 | grep -v "it/s\]" | tail -12
else
    python3 tools/bench_eviction.py --device cuda --methods long_context streaming h2o snapkv tova fixed_budget \
        --out "$OUT/eviction-h100-tiers.json" --max-minutes 9 2>&1 | grep -v "it/s\]" | tail -40
fi
