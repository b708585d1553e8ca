#!/usr/bin/env bash
# One-shot GQSA quality matrix on the two local models (issue 2's table).
# usage: bash benchmarks/oneshot_matrix.sh [OUT_DIR]   (default runs/oneshot); prints a markdown table.
# env: ASSETS (default ../shared/assets), COMPRESS_EXTRA / EVAL_EXTRA (extra arguments, e.g. --device cuda)
set -euo pipefail
A=${ASSETS:-../shared/assets}
OUT=${1:-runs/oneshot}
mkdir -p "$OUT"
S260=("$A/models/stories260K/stories260K.bin" --tokenizer "$A/models/stories260K/tok512.bin"
      --calib "$A/data/wikitext2/wiki.valid.tokens" --nsamples 128 --seqlen 256)
S260_EVAL="$A/data/wikitext2/wiki.test.raw"
GUT=("$A/models/gutenberg-llama-22m" --calib "$A/data/gutenberg/calib.txt" --nsamples 128 --seqlen 512)
GUT_EVAL="$A/data/gutenberg/heldout.txt"
run() {  # name, eval text, compress args...
  local name=$1 text=$2; shift 2
  [ -f "$OUT/$name/gqsa_report.json" ] && grep -q '"ppl"' "$OUT/$name/gqsa_report.json" && return
  rm -rf "$OUT/$name"
  gqsa compress "$@" ${COMPRESS_EXTRA:-} --out "$OUT/$name" >/dev/null 2>&1
  gqsa eval "$OUT/$name" --ppl "$text" ${EVAL_EXTRA:-} 2>/dev/null
}
for sal in magnitude; do  # hessian (the default) is the S0.5 G16 row below
  run "s260-w4s50g16-$sal" "$S260_EVAL" "${S260[@]}" --sparsity 0.5 --group-size 16 --saliency $sal
  run "gut-w4s50g16-$sal" "$GUT_EVAL" "${GUT[@]}" --sparsity 0.5 --group-size 16 --saliency $sal
done
for g in 16 32; do for s in 0 0.3 0.5; do
  run "s260-w4s${s}g$g" "$S260_EVAL" "${S260[@]}" --sparsity $s --group-size $g
  run "gut-w4s${s}g$g" "$GUT_EVAL" "${GUT[@]}" --sparsity $s --group-size $g
done; done
python - "$OUT" <<'PY'
import json, sys, pathlib
print("| run | saliency | G | S (actual) | bits/weight | ppl | eval text | seconds |")
print("|---|---|---|---|---|---|---|---|")
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    r = json.loads((d / "gqsa_report.json").read_text())
    e = r["evaluations"][-1]; c = r["config"]; t = r["totals"]
    print(f"| {d.name} | {c['saliency']} | {c['group_size']} | {c['sparsity']} ({t['sparsity']:.3f}) | "
          f"{t['bits_per_weight']:.3f} | {e['ppl']:.2f} | {pathlib.Path(e['text']).name} (ctx {e['context']}) | {r['seconds']} |")
PY
