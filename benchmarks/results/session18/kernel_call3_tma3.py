"""Prototype 3: K = 64 per dot with a TMA-loaded weight operand (issue 11, large M)."""
import json, sys
from pathlib import Path
import torch, triton, triton.language as tl
ROOT = Path(__file__).resolve().parents[3]  # (ran from .carry/me/ as parents[2]; committed here)
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "benchmarks"))
import gemv as bg
from gqsa.kernels import block_gemm, dispatch
from gqsa.kernels.block_layout import build_block_layout, dequantize as block_deq
DEV = "cuda" if torch.cuda.is_available() else "cpu"
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEV))


@triton.jit
def pre4_kernel(x_ptr, wd_ptr, col_ptr, bp_ptr, y_ptr, M, N, K, stride_wd, rows_wd,
                R: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr, MODE: tl.constexpr,
                STEPS: tl.constexpr = 0):
    """4 slots a step, one dot of K = 4·G. MODE 0: x gathered by pointers as A [BM, 4G], wd by TMA as B;
    MODE 1: x by 4 TMA boxes joined in registers as A (wd columns in the join's order), wd by TMA;
    MODE 2: wd by TMA as A [R, 4G], x gathered by pointers as B [4G, BM] (acc transposed)."""
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    wdd = tl.make_tensor_descriptor(wd_ptr, shape=[rows_wd, stride_wd], strides=[stride_wd, 1], block_shape=[R, 4 * G])
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, G])
    s_lo = tl.load(bp_ptr + blk)
    ns = tl.load(bp_ptr + blk + 1) - s_lo
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    m_ok = offs_m < M
    ar_j = tl.arange(0, 4 * G)
    if MODE == 2:
        acc = tl.zeros([R, BM], tl.float32)
    else:
        acc = tl.zeros([BM, R], tl.float32)
    for i in tl.range(0, STEPS if STEPS > 0 else tl.cdiv(ns, 4), num_stages=NS):
        wa = wdd.load([blk * R, i * 4 * G])  # [R, 4G]
        if MODE == 1:
            c0 = tl.load(col_ptr + s_lo + i * 4 + 0, mask=i * 4 + 0 < ns, other=-1)
            c1 = tl.load(col_ptr + s_lo + i * 4 + 1, mask=i * 4 + 1 < ns, other=-1)
            c2 = tl.load(col_ptr + s_lo + i * 4 + 2, mask=i * 4 + 2 < ns, other=-1)
            c3 = tl.load(col_ptr + s_lo + i * 4 + 3, mask=i * 4 + 3 < ns, other=-1)
            a01 = tl.join(xd.load([m0, c0 * G]), xd.load([m0, c1 * G]))
            a23 = tl.join(xd.load([m0, c2 * G]), xd.load([m0, c3 * G]))
            xa = tl.reshape(tl.join(a01, a23), (BM, 4 * G))
            acc = tl.dot(xa, wa.T, acc)
        else:
            s_j = i * 4 + ar_j // G
            ok_j = s_j < ns
            col_j = tl.max_constancy(tl.load(col_ptr + s_lo + s_j, mask=ok_j, other=-1), G)
            feat = tl.max_contiguous(tl.multiple_of(col_j * G + ar_j % G, G), G)
            kmask = (col_j >= 0) & (feat < K)
            if MODE == 0:
                xa = tl.load(x_ptr + offs_m[:, None] * K + feat[None, :], mask=m_ok[:, None] & kmask[None, :], other=0.0)
                acc = tl.dot(xa, wa.T, acc)
            else:
                xk = tl.load(x_ptr + feat[:, None] + offs_m[None, :] * K, mask=kmask[:, None] & m_ok[None, :], other=0.0)
                acc = tl.dot(wa, xk, acc)
    offs_n = blk * R + tl.arange(0, R)
    if MODE == 2:
        tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[None, :] & (offs_n < N)[:, None])
    else:
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_n < N)[None, :])


def join_order(wd, G=16):
    """wd's columns per step of 4 slots in tl.join's order: k = t·4 + i·2 + h holds slot 2h + i, feature t."""
    r, c = wd.shape
    steps = c // (4 * G)
    k = torch.arange(4 * G, device=wd.device)
    t, i, h = k // 4, (k // 2) % 2, k % 2
    src = (2 * h + i) * G + t  # column inside the step
    idx = (torch.arange(steps, device=wd.device)[:, None] * 4 * G + src[None, :]).reshape(-1)
    return wd[:, idx].contiguous()


def pad_steps(wd, G=16):
    c = wd.shape[1]
    c4 = -(-c // (4 * G)) * 4 * G
    if c4 == c:
        return wd
    return torch.nn.functional.pad(wd, (0, c4 - c))


def launch(x, lay, wd, y, bm, ns, nw, mode, steps=0):
    m, k = x.shape
    n = lay.shape[0]
    pre4_kernel[(triton.cdiv(m, bm), lay.n_blocks)](x, wd, lay.cols, lay.block_ptr, y, m, n, k, wd.shape[1], wd.shape[0],
                                                    R=lay.rows, G=lay.group_size, BM=bm, NS=ns, MODE=mode,
                                                    num_warps=nw, STEPS=steps)
    return y


def main(out):
    rows_out = []
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    for rows in (128, 64):
        for n, k in shapes:
            gen = torch.Generator(device="cuda").manual_seed(0)
            p = bg.random_block_packed(n, k, 0.5, 16, rows, gen=gen)
            lay = build_block_layout(p, rows)
            wref = block_deq(lay, torch.float16)
            wd = pad_steps(block_gemm.dequantize_kept(lay, torch.float16))
            # padding slots past a block's end: zero them (the scratch is uninitialised there)
            slots = (lay.block_ptr[1:] - lay.block_ptr[:-1]).repeat_interleave(rows)[:wd.shape[0]]
            colidx = torch.arange(wd.shape[1], device="cuda")
            wd = torch.where(colidx[None, :] < (slots[:, None] * 16), wd, torch.zeros((), dtype=wd.dtype, device="cuda"))
            wdj = join_order(wd)
            for m in (512, 2048):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = x.float() @ wref.float().t()
                y = torch.empty(m, n, device="cuda", dtype=torch.float16)
                cfg = block_gemm.for_group(dispatch.H200_TABLE.block.config(rows, m), 16)
                w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) / 64
                row = {"rows": rows, "n": n, "k": k, "m": m,
                       "cublas": bg.t_graph([lambda: torch.nn.functional.linear(x, w16)], min_calls=20),
                       "cur": bg.t_graph([lambda: block_gemm.launch_block(x, lay, None, y, cfg)], min_calls=20),
                       "pre_pass": bg.t_graph([lambda: block_gemm.dequantize_kept(lay, torch.float16)], min_calls=20)}
                for mode in (0, 1, 2):
                    for (bm, ns, nw) in [(128, 3, 4), (128, 4, 8), (256, 3, 8), (128, 5, 4)]:
                        key = f"m{mode} bm{bm} ns{ns} w{nw}"
                        w_ = wdj if mode == 1 else wd
                        try:
                            g = lambda: launch(x, lay, w_, y, bm, ns, nw, mode)
                            y.zero_(); g()
                            err = float((y.float() - ref).abs().max() / ref.abs().max())
                            row[key] = (round(bg.t_graph([g], min_calls=20), 2), err)
                        except Exception as e:
                            row[key] = repr(e)[:300]
                print(json.dumps(row), flush=True)
                rows_out.append(row)
    Path(out, "tma3.json").write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
