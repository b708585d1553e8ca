#!/bin/bash
# Ran as .carry/me/*.sh from the repository root (bash benchmarks/results/session18/THIS.sh runs the committed copy; $OUT: an output folder)
export PYTHONPATH=$PWD/src
S=$(date +%s)
timeout 300 python benchmarks/results/session18/kernel_call4_sweep4.py $OUT > $OUT/sweep4.log 2>&1
tail -3 $OUT/sweep4.log; grep -A40 '^{$' $OUT/sweep4.log | head -60
echo "sweep done at $(( $(date +%s) - S )) s"
left=$(( 560 - ($(date +%s) - S) ))
if [ -f $OUT/table_tma.json ] && [ $left -gt 120 ]; then
  GQSA_DISPATCH_TABLE=$OUT/table_tma.json timeout $(( left - 10 )) python benchmarks/prefill.py --synthetic llama-2-7b \
    --settings fp16,w4s50g16b64,w4s50g16b128,w4s30g64c64 --batch 1 --prompt-len 512,1024,2048 --rounds 5 \
    --json $OUT/prefill_tma.json > $OUT/prefill_tma.log 2>&1
  tail -30 $OUT/prefill_tma.log
fi
echo "total $(( $(date +%s) - S )) s"
