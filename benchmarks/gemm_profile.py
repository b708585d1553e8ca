#!/usr/bin/env python
"""A few launches of one GQSA layer through its LinearPlan, for ncu:

    ncu -k regex:_gemm_kernel -s 3 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section WarpStateStats python benchmarks/gemm_profile.py 11008 4096 16
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
import gemv as bg  # noqa: E402

from gqsa.kernels import dispatch  # noqa: E402

n, k, m = (int(v) for v in sys.argv[1:4])
plan = dispatch.LinearPlan(bg.random_packed(n, k, 0.5, 16))
x = torch.randn(m, k, device="cuda", dtype=torch.float16)
for _ in range(6):
    plan(x)
torch.cuda.synchronize()
print("path", plan.path(m), plan.table.config(m))
