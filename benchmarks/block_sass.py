#!/usr/bin/env python
"""SASS instructions per kept weight of the block kernel's main loop, without a GPU: compiles
``gqsa.kernels.block_kernels.block_kernel`` for sm_90 with Triton's bundled ptxas/nvdisasm and counts
the instructions of the innermost loop (the longest backward branch). Per weight and thread =
loop instructions / (weights one thread covers per iteration). Pointers and the int arguments that
are multiples of 16 in practice (M, N, K, strides, block count) are marked divisible by 16, as
Triton's launcher would specialize them.

    python benchmarks/block_sass.py '{"R": 64, "NP": 4, "nw": 1, "sa": false}'
"""
import collections
import json
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gqsa.kernels.block_kernels import block_kernel  # noqa: E402

ARGS = ["x_ptr", "qb_ptr", "sz_ptr", "col_ptr", "bp_ptr", "rmap_ptr", "bias_ptr", "y_ptr", "ws_ptr", "cnt_ptr",
        "wd_ptr", "M", "N", "K", "sps", "split_k", "stride_xm", "stride_ym", "n_blocks", "stride_wd", "spb"]
TYPES = ["*fp16", "*u8", "*i32", "*i32", "*i32", "*i32", "*fp16", "*fp16", "*fp32", "*i32", "*fp16"] + ["i32"] * 10
DIV16 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 19}


def build(R=64, BM=16, NP=4, nw=1, sa=False, bits=4, G=16, fz=False, stages=3, asm=True, col_vec=False,
          row_map=False, wide=False, pre=False, pdl=False, block_out=False):
    consts = dict(R=R, G=G, BITS=bits, BLOCK_M=BM, NP=NP, STEPS=0, SPLIT=True, HAS_BIAS=False, SCALE_AFTER=sa,
                  DOT_F32=False, FLOAT_Z=fz, FP16=True, ASM=asm and bits == 4 and not fz, COL_VEC=col_vec,
                  ROW_MAP=row_map, WIDE=wide, PRE=pre, BLOCK_OUT=block_out and row_map, PDL=pdl)
    sig = dict(zip(ARGS, TYPES)) | {k: "constexpr" for k in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i in DIV16}
    src = ASTSource(fn=triton.jit(block_kernel), signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=stages))


def loop_stats(sass: str, weights_per_thread: float):
    lines = sass.split("\n")
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(LBB\d+):", l.strip()))}
    best = None
    for i, l in enumerate(lines):
        m = re.search(r"BRA (LBB\d+)", l)
        if m and labels.get(m.group(1), i) < i and (best is None or i - labels[m.group(1)] > best[1] - best[0]):
            best = (labels[m.group(1)], i)
    body = [l.split("\t")[-1].strip() for l in lines[best[0] + 1:best[1] + 1] if "\t" in l]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split(" ")[0].split(".")[0].rstrip(";") for b in body)
    return len(body), len(body) / weights_per_thread, ops


def main():
    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    k = build(**kw)
    r, g, np_, nw, bits = kw.get("R", 64), kw.get("G", 16), kw.get("NP", 4), kw.get("nw", 1), kw.get("bits", 4)
    n, per, ops = loop_stats(k.asm["sass"], np_ * (8 // bits) * r * g / (nw * 32))
    print(f"{kw}: {n} loop instructions, {per:.2f} per kept weight and thread")
    print("  ", ", ".join(f"{o} {c}" for o, c in ops.most_common(16)))


if __name__ == "__main__":
    main()
