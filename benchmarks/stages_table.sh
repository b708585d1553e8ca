#!/usr/bin/env bash
# Issue 3's stage table: perplexity after one-shot, BQPO and BQPO+E2E-OQP for W4 G16 at S50% and S30%
# on gutenberg-llama-22m and stories260K, the four runs side by side on one GPU (default settings).
# usage: OUT=folder ASSETS=../shared/assets bash benchmarks/stages_table.sh  (DEVICE=cpu for the CPU; EXTRA=more args,
#        e.g. EXTRA="--e2e-lr-sweep 3e-3,1e-3" adds E2E-OQP rows at other learning rates from the same BQPO result)
set -u
A=${ASSETS:-../shared/assets}; OUT=${OUT:-runs/stages}; DEVICE=${DEVICE:-cuda}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
GUT="$A/models/gutenberg-llama-22m --calib $A/data/gutenberg/calib.txt --eval $A/data/gutenberg/heldout.txt
     --nsamples 128 --seqlen 512 --fp-ppl 48.009"
S260="$A/models/stories260K/stories260K.bin --tokenizer $A/models/stories260K/tok512.bin
      --calib $A/data/wikitext2/wiki.valid.tokens --eval $A/data/wikitext2/wiki.test.raw
      --nsamples 128 --seqlen 256 --fp-ppl 122.33"
for s in 0.5 0.3; do
  python benchmarks/stages_table.py $GUT --sparsity $s --device "$DEVICE" --threads 3 ${EXTRA:-} \
    --json "$OUT/gut-s$s.json" > "$OUT/gut-s$s.log" 2>&1 &
  python benchmarks/stages_table.py $S260 --sparsity $s --device "$DEVICE" --threads 3 ${EXTRA:-} \
    --json "$OUT/s260-s$s.json" > "$OUT/s260-s$s.log" 2>&1 &
done
wait
grep -h "^RESULT\|Error" "$OUT"/*.log | cut -c1-700
