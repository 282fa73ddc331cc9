#!/usr/bin/env bash
# Issue 17.2 on the GPU machine, right after tools/gpu/train_large_ref.sh on the same warm
# machine (it reads the model that one left in .large-ref/): the long-context protocol
# (docs/long-context.md 'Protocol') on ref-large at its full trained context, 8192 tokens:
# needle, multikey, multivalue, vartrack at 1024/2048/4096/8192 x 5 depths x PER_CELL rows,
# perplexity in 8192-token windows, the decode check ending at 8192; each config beside the full
# cache. One `kvpatch eval` shares the unpatched reference run; configs run in CONFIGS order
# (the five of issue 17 first, then more while time is left) and each one's JSON is written
# when it finishes, so the timeout (EVAL_TIMEOUT s) keeps whatever was done; the whole command
# stays under ~9 min. Estimated at PER_CELL=6: ~5 min for the reference run and the first five,
# ~8 min for all ten (from kvpatch-ref's H200 full-preset times, results/eval-full-h200: ~9 ms a
# forward, scaled to ~2,000 forwards a config here and 8 layers; long_context ~5x the others).
#   device: bash tools/gpu/eval_large_ref.sh        (PER_CELL=6, CONFIGS="...", EVAL_TIMEOUT=480)
# Back in $OUT: eval-large-ref.tar.gz (eval-large-ref/: eval-<config>.json, protocol-report.txt,
# the plots), eval-large-ref.log, protocol-report.txt.
set -o pipefail
: "${OUT:?set OUT to the folder for results}"
source tools/gpu/setup_env.sh
MODEL=.large-ref/kvpatch-ref-large
if [ ! -f "$MODEL/model.safetensors" ]; then
    echo "no $MODEL: run tools/gpu/train_large_ref.sh first, on the same warm machine" >&2
    exit 1
fi
CONFIGS=${CONFIGS:-long_context kivi4 kivi2 snapkv streaming fp8 h2o tova fibquant fixed_budget}
DIR=/tmp/eval-large-ref
rm -rf "$DIR" && mkdir -p "$DIR"
config_args=()
for c in $CONFIGS; do config_args+=(--config "$c"); done
start=$(date +%s)
timeout -k 10 "${EVAL_TIMEOUT:-480}" python3 -m kvpatch.cli eval --model "$MODEL" --preset protocol \
    --max-context 8192 --per-cell "${PER_CELL:-6}" "${config_args[@]}" --device cuda \
    --out "$DIR" --name large-ref-protocol-8192 2>&1 \
    | tr '\r' '\n' | grep -v -E "it/s|row/s|s/row|^ *$" > "$OUT/eval-large-ref.log"
status=${PIPESTATUS[0]}
echo "kvpatch eval: exit $status (0 ok, 1 a config broke its bounds, 124 timed out) after $(( $(date +%s) - start )) s" \
    | tee -a "$OUT/eval-large-ref.log"
grep -E "^[a-z0-9_]+: [0-9.]+ s$|^reference" "$OUT/eval-large-ref.log"
cp "$MODEL/training_report.json" "$DIR/reference-large-training-report.json"
python3 tools/protocol_report.py "$DIR" --order $CONFIGS --plot "$DIR/protocol-report.png" \
    > "$DIR/protocol-report.txt" 2>&1
cp "$DIR/protocol-report.txt" "$OUT/protocol-report.txt"
cat "$OUT/protocol-report.txt"
tar czf "$OUT/eval-large-ref.tar.gz" -C /tmp eval-large-ref
ls "$DIR"
exit $status
