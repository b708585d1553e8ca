import sys, torch
sys.path.insert(0, "src"); sys.path.insert(0, "benchmarks")
import gemm as bgemm
from gqsa.kernels import block_gemm, dispatch, reference
from gqsa.kernels.block_layout import build_block_layout
tb = dispatch.H200_TABLE.block
for (n, k, g, rows) in [(1000, 2048, 16, 128), (700, 1040, 16, 64)]:
    p = bgemm.layer_for_check(n, k, g, 4, 0.5, False, "uneven", rows=rows)
    lay = build_block_layout(p)
    for dt in (torch.bfloat16, torch.float16):
        w = reference.dequantize(p, dt).float()
        for m in (100, 600):
            x = torch.randn(m, k, device="cuda").to(dt)
            ref = x.float() @ w.t()
            cfg = tb.config(lay.rows, m)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
            block_gemm.launch_block(x, lay, None, y, cfg)
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            print(rows, lay.rows, dt, m, cfg.tma, "err %.2e" % err, "OK" if err < 1e-2 else "FAIL", flush=True)
