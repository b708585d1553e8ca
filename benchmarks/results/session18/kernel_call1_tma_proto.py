"""Prototype: block-uniform sparse GEMM with TMA operands (issue 11, large M). Run on the H200."""
import json, math, os, sys, time, traceback, statistics
from pathlib import Path
import torch
import triton
import triton.language as tl
ROOT = Path(__file__).resolve().parents[3]  # (ran from .carry/me/ as parents[2]; committed here)
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "benchmarks"))
import gemv as bg
from gqsa.kernels import block_gemm, dispatch, gemm
from gqsa.kernels.block_layout import build_block_layout, dequantize as block_deq

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


@triton.jit
def tma_pre_kernel(x_ptr, wd_ptr, col_ptr, bp_ptr, y_ptr, M, N, K, stride_wd, rows_wd,
                   R: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, NP: tl.constexpr, NS: tl.constexpr, STEPS: tl.constexpr = 0):
    """acc[BM, R] += x[BM, G(col)] @ wd[R, G(slot)]^T per slot; x as A, weights as B (transposed)."""
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, G])
    wdd = tl.make_tensor_descriptor(wd_ptr, shape=[rows_wd, stride_wd], strides=[stride_wd, 1], block_shape=[R, G])
    s_lo = tl.load(bp_ptr + blk)
    s_hi = tl.load(bp_ptr + blk + 1)
    ns = s_hi - s_lo
    acc = tl.zeros([BM, R], tl.float32)
    m0 = pid_m * BM
    for i in tl.range(0, STEPS if STEPS > 0 else tl.cdiv(ns, NP), num_stages=NS):
        for p in tl.static_range(NP):
            j = i * NP + p
            col = tl.load(col_ptr + s_lo + j, mask=j < ns, other=-1)
            xa = xd.load([m0, col * G])
            wa = wdd.load([blk * R, j * G])
            acc = tl.dot(xa, wa.T, acc)
    offs_m = m0 + tl.arange(0, BM)
    offs_n = blk * R + tl.arange(0, R)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def tma_fused_kernel(x_ptr, qb_ptr, sz_ptr, col_ptr, bp_ptr, y_ptr, M, N, K,
                     R: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, NP: tl.constexpr, NS: tl.constexpr, STEPS: tl.constexpr = 0):
    """4-bit, fp16, integer zeros: acc[R, BM] += deq(w)[R, G] @ x[BM, G]^T; weights dequantized in registers (A)."""
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, G])
    s_lo = tl.load(bp_ptr + blk)
    s_hi = tl.load(bp_ptr + blk + 1)
    u_lo = s_lo // 2
    nu = (s_hi - s_lo) // 2
    ar_r = tl.arange(0, R)
    ar_t = tl.arange(0, G)
    acc = tl.zeros([R, BM], tl.float32)
    m0 = pid_m * BM
    for i in tl.range(0, STEPS if STEPS > 0 else tl.cdiv(nu, NP), num_stages=NS):
        for p in tl.static_range(NP):
            ul = i * NP + p
            ok = ul < nu
            u = u_lo + ul
            b = tl.load(qb_ptr + u * (R * G) + ar_r[:, None] * G + ar_t[None, :], mask=ok, other=0)
            for c in tl.static_range(2):
                slot = u * 2 + c
                col = tl.load(col_ptr + slot, mask=ok, other=-1)
                szw = tl.load(sz_ptr + slot * R + ar_r, mask=ok, other=0)
                s = (szw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)[:, None]
                zc = ((szw >> 16).to(tl.uint8).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)[:, None]
                q = (b >> (c * 4)) & 15
                w = ((q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zc) * s
                xa = xd.load([m0, col * G])
                acc = tl.dot(w, xa.T, acc)
    offs_n = blk * R + ar_r
    offs_m = m0 + tl.arange(0, BM)
    tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


STEPS = 0


def run_pre(x, lay, wd, stride, y, bm, np_, nw, ns):
    m, k = x.shape
    n = lay.shape[0]
    grid = (triton.cdiv(m, bm), lay.n_blocks)
    tma_pre_kernel[grid](x, wd, lay.cols, lay.block_ptr, y, m, n, k, stride, wd.shape[0],
                         R=lay.rows, G=lay.group_size, BM=bm, NP=np_, NS=ns, num_warps=nw, STEPS=STEPS)
    return y


def run_fused(x, lay, y, bm, np_, nw, ns):
    m, k = x.shape
    n = lay.shape[0]
    grid = (triton.cdiv(m, bm), lay.n_blocks)
    tma_fused_kernel[grid](x, lay.qweight, lay.sz, lay.cols, lay.block_ptr, y, m, n, k,
                           R=lay.rows, G=lay.group_size, BM=bm, NP=np_, NS=ns, num_warps=nw, STEPS=STEPS)
    return y


def main(out):
    res = {"rows": []}
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    ms = [512, 2048]
    pre_cfgs = [(128, 4, 4, 4), (128, 8, 4, 3), (128, 4, 8, 4), (256, 4, 8, 3), (256, 2, 8, 4), (64, 4, 4, 4),
                (128, 2, 4, 6)]
    fused_cfgs = [(128, 2, 4, 3), (128, 2, 8, 3), (256, 2, 8, 3), (64, 2, 4, 3)]
    for rows in (128, 64):
        for n, k in shapes:
            gen = torch.Generator(device="cuda").manual_seed(0)
            p = bg.random_block_packed(n, k, 0.5, 16, rows, gen=gen)
            lay = build_block_layout(p, rows)
            wref = block_deq(lay, torch.float16)  # [N, K] dense
            wd = block_gemm.dequantize_kept(lay, torch.float16)
            stride = wd.shape[1]
            w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) / 64
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = (x.float() @ wref.float().t())
                y = torch.empty(m, n, device="cuda", dtype=torch.float16)
                flops = 2 * m * n * k
                row = {"rows": rows, "n": n, "k": k, "m": m}
                row["cublas_us"] = bg.t_graph([lambda: torch.nn.functional.linear(x, w16)], min_calls=20)
                try:
                    plan_cfg = block_gemm.for_group(dispatch.H200_TABLE.block.config(rows, m), 16)
                    row["cur_cfg"] = str(plan_cfg)
                    row["cur_us"] = bg.t_graph([lambda: block_gemm.launch_block(x, lay, None, y, plan_cfg)], min_calls=20)
                    row["cur_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                except Exception as e:
                    row["cur_err_msg"] = repr(e)[:300]
                row["pre_pass_us"] = bg.t_graph([lambda: block_gemm.dequantize_kept(lay, torch.float16)], min_calls=20)
                best = None
                for c in pre_cfgs:
                    try:
                        y.zero_()
                        run_pre(x, lay, wd, stride, y, *c)
                        err = float((y.float() - ref).abs().max() / ref.abs().max())
                        t = bg.t_graph([lambda: run_pre(x, lay, wd, stride, y, *c)], min_calls=20)
                        row[f"pre{c}"] = (round(t, 2), err)
                        if err < 1e-2 and (best is None or t < best[0]):
                            best = (t, c)
                    except Exception as e:
                        row[f"pre{c}"] = repr(e)[:200]
                row["tma_pre_best"] = best
                bestf = None
                for c in fused_cfgs:
                    try:
                        y.zero_()
                        run_fused(x, lay, y, *c)
                        err = float((y.float() - ref).abs().max() / ref.abs().max())
                        t = bg.t_graph([lambda: run_fused(x, lay, y, *c)], min_calls=20)
                        row[f"fused{c}"] = (round(t, 2), err)
                        if err < 1e-2 and (bestf is None or t < bestf[0]):
                            bestf = (t, c)
                    except Exception as e:
                        row[f"fused{c}"] = repr(e)[:200]
                row["tma_fused_best"] = bestf
                row["cublas_tflops"] = flops / row["cublas_us"] / 1e6
                if best:
                    row["tma_pre_gemm_tflops_eff"] = flops / 2 / best[0] / 1e6
                print(json.dumps(row), flush=True)
                res["rows"].append(row)
    Path(out, "tma_proto.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
