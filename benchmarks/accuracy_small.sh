#!/usr/bin/env bash
# Small-protocol one-shot rows of issue 13 on the CPU: calibration 32x512 from gutenberg/calib.txt,
# perplexity on the first $WINDOWS windows of 512 tokens of gutenberg/heldout.txt.
# usage: bash benchmarks/accuracy_small.sh MODEL OUT_DIR NAME [gqsa compress args...]
set -euo pipefail
A=${ASSETS:-../shared/assets}
MODEL=$1 OUT=$2 NAME=$3; shift 3
mkdir -p "$OUT"
nice python -m gqsa.cli compress "$MODEL" --calib "$A/data/gutenberg/calib.txt" --nsamples 32 --seqlen 512 --device cpu \
    --out "$OUT/$NAME" --overwrite "$@" 2>&1 | grep -E "^wrote|error" || true
nice python -m gqsa.cli eval "$OUT/$NAME" --ppl "$A/data/gutenberg/heldout.txt" --context 512 --max-windows "${WINDOWS:-24}" 2>/dev/null \
    | sed "s|^|$NAME: |"
