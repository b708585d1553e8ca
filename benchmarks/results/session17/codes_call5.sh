#!/bin/bash
cd "$(dirname "$0")/../.."
export PYTHONPATH=src
A=.carry/assets
base="python3 benchmarks/stages_table.py $A/models/gutenberg-llama-22m --calib $A/data/gutenberg/calib.txt --eval $A/data/gutenberg/heldout.txt --context 512 --seqlen 512 --device cuda --skip-fp --oneshot-ppl 0 --kl-windows 0 --threads 4 --sweep-only --nsamples 1024"
sweep='[{"e2e_lr_codes": 0}, {"e2e_lr_codes": null}]'
timeout 575 $base --bits 3 --group-size 128 --sparsity 0 --set '{"e2e_loss": "kd", "e2e_lr": 0.01}' --e2e-sweep "$sweep" --json $OUT/w3s0g128_n1024.json > $OUT/w3s0g128_n1024.log 2>&1 &
timeout 575 $base --sparsity 0.5 --group-size 16 --set '{"e2e_loss": "kd", "e2e_lr": 0.01}' --e2e-sweep "$sweep" --json $OUT/w4s50g16_n1024.json > $OUT/w4s50g16_n1024.log 2>&1 &
timeout 575 $base --sparsity 0.3 --group-size 64 --set '{"e2e_loss": "kd", "e2e_lr": 0.01, "mask": "rerank4"}' --e2e-sweep "$sweep" --json $OUT/w4s30g64r4_n1024.json > $OUT/w4s30g64r4_n1024.log 2>&1 &
wait
