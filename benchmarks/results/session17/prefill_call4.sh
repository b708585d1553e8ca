#!/bin/bash
cd "$(dirname "$0")/../.."
export PYTHONPATH=src
timeout 300 python benchmarks/prefill.py --synthetic llama-2-7b --settings fp16,w4s50g16,w4s50g16b64,w4s50g16b128,w4s30g64c64 \
  --batch 1 --prompt-len 128,512,1024,2048 --rounds 10 --json $OUT/prefill_7b.json > $OUT/prefill_7b.txt 2>&1
echo "rc 7b $?" >> $OUT/rc.txt
timeout 150 python benchmarks/prefill.py --synthetic llama-2-7b --settings fp16,w4s50g16b64,w4s50g16b128 \
  --batch 4 --prompt-len 128,256 --rounds 8 --json $OUT/prefill_7b_b4.json > $OUT/prefill_7b_b4.txt 2>&1
echo "rc 7b b4 $?" >> $OUT/rc.txt
timeout 120 python -m gqsa.cli bench --synthetic llama-2-7b --settings fp16,w4s50g16b128 --batch 1,4 --prompt-len 256 \
  --new-tokens 32 --repeats 3 --json $OUT/bench.json > $OUT/bench.txt 2>&1
echo "rc bench $?" >> $OUT/rc.txt
