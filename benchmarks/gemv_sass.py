#!/usr/bin/env python
"""SASS instructions per kept group of the decode GEMV's main loop, without a GPU.

Compiles a kernel of :mod:`gqsa.kernels.gemv` (``v1``: ``_gemv_kernel``, the row/task kernel; ``v2``:
``_gemv2_kernel``, the load-time-layout kernel of :mod:`gqsa.kernels.gemv_layout`) for sm_90 with
Triton's bundled ptxas (``ASTSource`` + ``GPUTarget("cuda", 90, 32)``) and counts the instructions of
the main loop: the longest backward branch, as ``benchmarks/block_sass.py`` does. Per kept group =
loop instructions / groups one thread covers per iteration. Pointers and the int arguments that are
multiples of 16 in practice are marked divisible by 16, as Triton's launcher specializes them.

    python benchmarks/gemv_sass.py v1            # today's data-centric kernel, W4 G16 fp16
    python benchmarks/gemv_sass.py v2 '{"UC": 8, "UPT": 4}'
    python benchmarks/gemv_sass.py v2 --dump     # print the loop body
    python benchmarks/gemv_sass.py v2p           # the software-pipelined v2 kernel (_gemv2p_kernel)
    python benchmarks/gemv_sass.py v2p '{"UPT": 4, "REG": true, "PF": 2, "HALF": true, "maxnreg": 80}'
                                                 # the packed-fp16 dot; maxnreg: ptxas's register limit
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
from gqsa.kernels import gemv  # noqa: E402


def _compile(fn, args, types, div16, consts, nw, stages=1, maxnreg=None):
    sig = dict(zip(args, types)) | {k: "constexpr" for k in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    src = ASTSource(fn=triton.jit(fn), signature=sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=nw, num_stages=stages) | ({"maxnreg": maxnreg} if maxnreg else {})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def build_v1(G=16, bits=4, nw=1, upt=2, uc=16, bf16=False, row_mode=True):
    args = ["x_ptr", "qw_ptr", "col_ptr", "s_ptr", "z_ptr", "rp_ptr", "tab_ptr", "need_ptr", "ws_ptr", "cnt_ptr",
            "bias_ptr", "y_ptr", "N", "nnz", "task_size", "stride_xb", "stride_yb", "B", "one"]
    qt = {(4, 16): "*i64", (4, 8): "*i32", (2, 16): "*i32", (2, 8): "*i16", (8, 8): "*i64"}[(bits, uc)]
    types = (["*i64", qt, "*i16", "*fp16", "*u8", "*i32", "*i32", "*i32", "*fp32", "*i32", "*fp16", "*fp16"]
             + ["i32"] * 7)
    bg = gemv.default_block_g(G, nw, upt, uc)
    consts = dict(G=G, BITS=bits, BLOCK_G=bg, BLOCK_B=1, ROW_MODE=row_mode, X_BF16=bf16, FLOAT_Z=False,
                  USE_ASM=bits == 4, HAS_BIAS=False, WS_STRIDE=16, DEQ=gemv._PTX_DEQ4,
                  DOT=gemv._PTX_DOT_BF16 if bf16 else gemv._PTX_DOT_F16, UC=uc, PDL=False)
    k = _compile(gemv._gemv_kernel, args, types, set(range(12)) | {15, 16}, consts, nw)
    return k, bg / (32 * nw)


def build_v2(G=16, bits=4, nw=1, UC=None, UPT=None, bf16=False, asm=True, stages=1, pipe=False, maxnreg=None, **kw):
    from gqsa.kernels import gemv_layout as gl
    consts = gl.kernel_constexprs(G=G, BITS=bits, UC=UC, UPT=UPT, X_BF16=bf16, HAS_BIAS=False, ASM=asm,
                                  NUM_THREADS=32 * nw, **kw)
    args, types, div16 = gl.sass_signature(consts, pipe)
    k = _compile(gl._gemv2p_kernel if pipe else gl._gemv2_kernel, args, types, div16, consts, nw, stages, maxnreg)
    return k, consts["UPT"] * consts["UC"] / G  # kept groups per thread and step


# what marks a block skipped by a forward branch as off the hot path: a row's epilogue (a warp shuffle, an
# atomic, a store, a barrier: once per output row; the half dot's fp32 redo of an overflowed row sits inside it)
COLD = r"SHFL|ATOM|STG|BAR"


def loop_stats(sass: str, groups_per_thread: float):
    """(instructions, per group, opcode counts, body) of the hot path of the main loop: the longest
    backward branch, less every block that a forward branch inside it skips and that matches ``COLD`` (a
    row's epilogue: a warp shuffle, an atomic or a store, run once per output row, not per group)."""
    lines = sass.split("\n")
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^\s*\.?(L\w*BB\w+):", l.strip()))}
    best = None
    for i, l in enumerate(lines):  # a loop's back edge is a predicated branch (an unpredicated one going back
        # is the jump from an out-of-line block, e.g. BRA.DIV's divergent-shuffle path, to where it came from)
        m = re.search(r"@!?U?P\w+\s+BRA\s+(?:`\()?\.?(L\w*BB\w+)", l)
        if m and labels.get(m.group(1), i) < i and (best is None or i - labels[m.group(1)] > best[1] - best[0]):
            best = (labels[m.group(1)], i)
    if best is None:
        return 0, 0.0, collections.Counter(), []
    lo, hi = best
    skip = set()
    for i in range(lo + 1, hi + 1):
        m = re.search(r"BRA\s+(?:`\()?\.?(L\w*BB\w+)", lines[i])
        t = labels.get(m.group(1)) if m else None
        if t is not None and i < t <= hi and any(re.search(COLD, lines[j]) for j in range(i + 1, t)):
            skip.update(range(i + 1, t))
    body = [lines[i].split("\t")[-1].strip() if "\t" in lines[i] else lines[i].strip()
            for i in range(lo + 1, hi + 1) if i not in skip]
    body = [b for b in body if b and re.match(r"^(@!?U?P\w+\s+)?[A-Z]", b) and not b.endswith(":")]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split(" ")[0].split(".")[0].rstrip(";") for b in body)
    return len(body), len(body) / groups_per_thread, ops, body


def regs(k) -> str:
    """Registers per thread from the cubin (cuobjdump --dump-resource-usage, bundled with Triton)."""
    import os
    import subprocess
    import tempfile
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return "?"
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.cubin")
        Path(f).write_bytes(k.asm["cubin"])
        out = subprocess.run([str(tool), "--dump-resource-usage", f], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", out)
    return m.group(1) if m else "?"


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "v1"
    kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].startswith("{") else {}
    if which == "v2p":
        kw["pipe"] = True
    k, gpt = (build_v1 if which == "v1" else build_v2)(**kw)
    n, per, ops, body = loop_stats(k.asm["sass"], gpt)
    print(f"{which} {kw}: {n} loop instructions, {per:.1f} per kept group and thread "
          f"(regs {regs(k)})")
    print("  ", ", ".join(f"{o} {c}" for o, c in ops.most_common(20)))
    if "--dump" in sys.argv:
        print("\n".join(body))
    if "--full" in sys.argv:
        print(k.asm["sass"])


if __name__ == "__main__":
    main()
