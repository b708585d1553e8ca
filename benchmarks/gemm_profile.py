#!/usr/bin/env python
"""A few launches of one GQSA layer, for ncu; with ``--rows R`` a block-uniform layer through the block
kernels (``--cfg`` a BlockConfig as JSON), else an irregular one through its LinearPlan. ``--asm DIR``
writes the compiled kernels' PTX and SASS there (instruction counts without counters):

    ncu -k regex:_gemm_kernel -s 3 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section WarpStateStats python benchmarks/gemm_profile.py 11008 4096 16
    ncu -k regex:block_kernel -s 3 -c 1 ... python benchmarks/gemm_profile.py 11008 4096 16 --rows 16
"""
import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
import gemv as bg  # noqa: E402

from gqsa.kernels import block_gemm, dispatch, gemm  # noqa: E402
from gqsa.kernels.block_layout import build_block_layout  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("n", type=int)
ap.add_argument("k", type=int)
ap.add_argument("m", type=int)
ap.add_argument("--rows", type=int, default=0)
ap.add_argument("--cfg", default="{}")
ap.add_argument("--asm", default="")
a = ap.parse_args()
x = torch.randn(a.m, a.k, device="cuda", dtype=torch.float16)
if a.rows:
    lay = build_block_layout(bg.random_block_packed(a.n, a.k, 0.5, 16, a.rows), a.rows)
    cfg = block_gemm.BlockConfig(**json.loads(a.cfg))
    y = torch.empty(a.m, a.n, device="cuda", dtype=torch.float16)
    for _ in range(6):
        block_gemm.launch_block(x, lay, None, y, cfg)
    print("block", a.rows, cfg)
else:
    plan = dispatch.LinearPlan(bg.random_packed(a.n, a.k, 0.5, 16))
    for _ in range(6):
        plan(x)
    print("path", plan.path(a.m), plan.table.config(a.m))
torch.cuda.synchronize()
if a.asm:
    out = Path(a.asm)
    out.mkdir(parents=True, exist_ok=True)
    for i, ck in enumerate(gemm._FAST.values()):
        name = ck.name if hasattr(ck, "name") else f"k{i}"
        for kind in ("ptx", "sass"):
            try:
                (out / f"{name}_{i}.{kind}").write_text(str(ck.asm[kind]))
            except Exception as e:  # noqa: BLE001
                print("asm", kind, repr(e)[:200])
        print(name, "regs", getattr(ck, "n_regs", None), "spills", getattr(ck, "n_spills", None))
