#!/bin/bash
# issue 13, session 18: four settings at 2048 calibration windows, one process each, side by side.
# Env for a CPU dry run only: N (windows), DEV (device), EXTRA (more stages_table args), SETX (more --set entries)
cd "$(dirname "$0")/../../.."  # (ran from .carry/h13/ as ../..; needs .carry/assets, see RESULTS "Session 18")
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:?}
N=${N:-2048}; DEV=${DEV:-cuda}; EXTRA=${EXTRA:-}; SETX=${SETX:-}
A=.carry/assets
base="python3 benchmarks/stages_table.py $A/models/gutenberg-llama-22m --calib $A/data/gutenberg/calib.txt --eval $A/data/gutenberg/heldout.txt --context 512 --seqlen 512 --device $DEV --skip-fp --oneshot-ppl 0 --kl-windows 0 --threads 4 --sweep-only --nsamples $N $EXTRA"
kd='"e2e_loss": "kd", "e2e_lr": 0.01'
one() {  # name, then the process's own arguments
  local name=$1; shift
  ( echo "start $(date -u +%FT%TZ)"; s=$SECONDS
    timeout 575 $base "$@" --json $OUT/$name.json; rc=$?
    echo "end $(date -u +%FT%TZ) rc $rc wall $((SECONDS - s)) s" ) > $OUT/$name.log 2>&1 &
}
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
one w4s30g16_n$N --sparsity 0.3 --group-size 16 --set "{$kd$SETX}" \
    --e2e-sweep '[{"e2e_epochs": 10, "e2e_lr_codes": null}]'
one w4s50g16_n$N --sparsity 0.5 --group-size 16 --set "{$kd$SETX}" \
    --e2e-sweep '[{"e2e_epochs": 10, "e2e_lr_codes": null}]'
one w3s0g128_n$N --bits 3 --group-size 128 --sparsity 0 --set "{$kd$SETX}" \
    --e2e-sweep '[{"e2e_lr_codes": 0}, {"e2e_lr_codes": 0.1}]'
one w4s30g64r4_n$N --sparsity 0.3 --group-size 64 --set "{$kd, \"mask\": \"rerank4\"$SETX}" \
    --e2e-sweep '[{"e2e_epochs": 10, "e2e_lr_codes": null}]'
wait
for f in $OUT/*.log; do echo "== $f"; grep -v "Loading weights" $f | tail -12; done
