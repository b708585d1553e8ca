#!/usr/bin/env bash
# Bitwise check of compression outputs: compress fixed small settings on the local models and print the
# sha256 of every file a run writes except gqsa_report.json (it holds times and paths). Run it before and
# after a change that must not change results, and diff the two outputs:
#   bash benchmarks/bitwise_oneshot.sh /tmp/before > before.txt; ... ; bash benchmarks/bitwise_oneshot.sh /tmp/after > after.txt
# One torch thread (--threads 1), CPU, fixed seed. benchmarks/results/bitwise_oneshot.sha256 is the output on main
# c9eaf5f (torch 2.13.0 CPU, x86-64; identical on fd1f8c2), which the issue-15 refactor reproduces:
#   bash benchmarks/bitwise_oneshot.sh /tmp/bw | diff benchmarks/results/bitwise_oneshot.sha256 -
set -euo pipefail
OUTDIR=${1:-/tmp/gqsa-bitwise}
ASSETS=${GQSA_ASSETS:-$(cd "$(dirname "$0")/../.." && pwd)/shared/assets}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE/src${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$OUTDIR"; mkdir -p "$OUTDIR"
S=$ASSETS/models/stories260K/stories260K.bin
G=$ASSETS/models/gutenberg-llama-22m
run() {  # name, args...
  local name=$1; shift
  python -m gqsa.cli compress "$@" --threads 1 --device cpu --seed 0 --out "$OUTDIR/$name" >"$OUTDIR/$name.log" 2>&1 \
    || { cat "$OUTDIR/$name.log" >&2; exit 1; }
}
run stories-oneshot "$S" --calib self --nsamples 16 --seqlen 128 --stages oneshot
run stories-oneshot-layer "$S" --calib self --nsamples 16 --seqlen 128 --stages oneshot --allocation layer --mask fixed --bits 3 --group-size 32
run gutenberg-oneshot "$G" --calib "$ASSETS/data/gutenberg/calib.txt" --nsamples 8 --seqlen 256 --stages oneshot --sparsity 0.3
# trained stage and baselines: the driver they share is refactored too
run stories-bqpo "$S" --calib self --nsamples 16 --seqlen 128 --stages bqpo --preset fast --bqpo-epochs 2
run stories-bqpo-e2e "$S" --calib self --nsamples 16 --seqlen 128 --stages bqpo+e2e --preset fast --bqpo-epochs 1 --e2e-epochs 1
for m in rtn gptq sparsegpt wanda magnitude; do
  run "stories-$m" "$S" --calib self --nsamples 16 --seqlen 128 --method $m
done
run stories-gptq-actorder "$S" --calib self --nsamples 16 --seqlen 128 --method gptq --act-order --bits 3 --group-size 32
run stories-sparsegpt-w4 "$S" --calib self --nsamples 16 --seqlen 128 --method sparsegpt --pattern 2:4 --prune-bits 4 --group-size 32
run stories-sparsegpt-unstructured "$S" --calib self --nsamples 16 --seqlen 128 --method sparsegpt --pattern unstructured --sparsity 0.6
run stories-oneshot-adaptive "$S" --calib self --nsamples 16 --seqlen 128 --stages oneshot --mask adaptive
cd "$OUTDIR"
find . -type f ! -name '*.log' ! -name gqsa_report.json | LC_ALL=C sort | xargs sha256sum
