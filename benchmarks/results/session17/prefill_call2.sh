#!/bin/bash
cd "$(dirname "$0")/../.."
export PYTHONPATH=src
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/env.txt 2>&1
python -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)" >> $OUT/env.txt 2>&1
timeout 330 python benchmarks/prefill.py --synthetic llama-2-7b --settings fp16,w4s50g16,w4s50g16b64,w4s50g16b128,w4s30g64c64 \
  --batch 1 --prompt-len 512,2048 --rounds 10 --profile --json $OUT/prefill_7b.json > $OUT/prefill_7b.txt 2>&1
echo "rc 7b $?" >> $OUT/env.txt
timeout 200 python benchmarks/prefill.py --synthetic llama-2-70b-layers=8 --settings fp16,w4s50g16,w4s50g16b64,w4s50g16b128 \
  --batch 1 --prompt-len 512,2048 --rounds 8 --profile --json $OUT/prefill_70b8.json > $OUT/prefill_70b8.txt 2>&1
echo "rc 70b $?" >> $OUT/env.txt
