#!/bin/bash
# Ran as .carry/me/*.sh from the repository root (bash benchmarks/results/session18/THIS.sh runs the committed copy; $OUT: an output folder)
export PYTHONPATH=$PWD/src
S=$(date +%s)
timeout 60 python benchmarks/gemm.py --block-check --quick --out $OUT/check > $OUT/check.log 2>&1; grep -i "fail\|check:" $OUT/check.log | head
echo "check at $(( $(date +%s) - S )) s"
P="python benchmarks/prefill.py --synthetic llama-2-7b --settings fp16,w4s50g16b64,w4s50g16b128,w4s30g64c64 --batch 1 --prompt-len 512,1024,2048 --rounds 4"
timeout 110 $P --json $OUT/prefill_final.json > $OUT/prefill_final.log 2>&1; tail -16 $OUT/prefill_final.log
echo "prefill default at $(( $(date +%s) - S )) s"
timeout 75 python benchmarks/results/session18/kernel_call5_pass5.py $OUT > $OUT/pass5.log 2>&1; tail -2 $OUT/pass5.log | cut -c1-1500
E=$(( $(date +%s) - S )); echo "pass sweep at $E s"
if [ -f $OUT/table_pass.json ] && [ $E -lt 200 ]; then
  GQSA_DISPATCH_TABLE=$OUT/table_pass.json timeout $(( 285 - E )) $P --json $OUT/prefill_pass.json > $OUT/prefill_pass.log 2>&1; tail -15 $OUT/prefill_pass.log
fi
echo "total $(( $(date +%s) - S )) s"
