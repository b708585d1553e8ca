#!/usr/bin/env python
"""SASS instructions per dense weight of the irregular tensor-core GEMM's main loop, without a GPU:
compiles ``gqsa.kernels.gemm._gemm_kernel`` for sm_90 with Triton's bundled ptxas and counts the
instructions of the innermost loop (the longest backward branch), as ``benchmarks/block_sass.py`` does.
Per dense weight and thread = loop instructions / (BLOCK_N · BLOCK_K / threads): pruned groups count,
the kernel dequantizes a dense tile. W4 G16 fp16 integer zeros unless the JSON says otherwise.

    python benchmarks/gemm_sass.py '{"BM": 16, "BN": 64, "nw": 4, "st": 1}'
    python benchmarks/gemm_sass.py '{"asm": false}'      # the plain-Triton dequantization
    python benchmarks/gemm_sass.py '{"canon": true}'     # the canonical view (layout version 3)
"""
import json
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from block_sass import loop_stats  # noqa: E402
from gqsa.kernels import gemm  # noqa: E402

def build(BM=16, BN=64, nw=4, st=1, G=16, bits=4, asm=True, split=True, bk=128, pf=False, maxnreg=0, halves=False,
          canon=False):
    consts = dict(G=G, BITS=bits, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=bk, TILES=0, SPLIT=split, HAS_BIAS=False,
                  EVEN_K=True, DOT_F32=False, FLOAT_Z=False, DEQ16=True, ASM=asm and bits == 4, PF=pf, HALVES=halves,
                  CANON=canon, PDL=False)
    ARGS, TYPES, DIV16 = gemm.sass_signature(canon)
    sig = dict(zip(ARGS, TYPES)) | {k: "constexpr" for k in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i in DIV16}
    src = ASTSource(fn=triton.jit(gemm._gemm_kernel), signature=sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=nw, num_stages=st) | ({"maxnreg": maxnreg} if maxnreg else {})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def main():
    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    k = build(**kw)
    per_thread = kw.get("BN", 64) * kw.get("bk", 128) / (kw.get("nw", 4) * 32)
    n, per, ops = loop_stats(k.asm["sass"], per_thread)
    regs = 1 + max((int(r) for r in re.findall(r"\bR(\d+)\b", k.asm["sass"])), default=-1)
    print(f"{kw}: {n} loop instructions, {per:.2f} per dense weight and thread, R0–R{regs - 1} used")
    print("  ", ", ".join(f"{o} {c}" for o, c in ops.most_common(16)))


if __name__ == "__main__":
    main()
