"""Triton kernel over the block-uniform :class:`~gqsa.kernels.block_layout.BlockLayout` (launcher:
:mod:`gqsa.kernels.block_gemm`).

``y[M, N] = x[M, K] @ Ŵᵀ (+ bias)``. Program ``(pid_m, b, pid_k)`` computes the ``BLOCK_M × R`` output
tile of row block ``b`` over its ``pid_k``-th range of ``sps`` steps; a step is ``KG`` kept groups
(``KG·G`` input features) of the block. Per step it

* loads the ``[KG·G/8, R]`` code words of the block — one contiguous run of memory, no index math —
  and the ``[KG, R]`` scales and zero points (as ``[KG·G/8, 1, R]`` tensors, one entry per word);
* gathers the activations of the ``KG`` kept group columns (``cols``, shared by the R rows):
  ``x[m, col·G + t]``, contiguous runs of G elements (8-element, 16-byte vectors);
* dequantizes ``s · (q − z)`` in registers (``[words, 8, R]`` codes by shifts; in fp16 when the
  activations are fp16 and the zero points integers — ``q − z`` exact, one rounding: the reference's
  value — else in float32, rounded to the activation dtype), and
* ``DOT``: accumulates ``tl.dot(x_tile [BLOCK_M, KG·G], w_tile [KG·G, R])`` in float32 on tensor cores;
  otherwise (GEMV, ``BLOCK_M`` ≤ 4) computes ``s · Σ x·(q − z)`` per word of 8 codes in float32 on the
  CUDA cores (``q − z`` exact, the scale applied once per word instead of once per weight: not the
  reference's rounding of each weight to the activation dtype, a float32-accurate product instead),
  accumulates ``[BLOCK_M, words, R]`` and reduces over k once at the end.

Only kept weights are touched: the work is proportional to the kept groups. Split-K
(``split_k > 1``): partial tiles go to a float32 workspace with atomics, the last program of a tile
(an atomic counter) reads the sum, zeroes the workspace and the counter, adds the bias and writes y —
one launch, CUDA-graph capturable (the scheme of :mod:`gqsa.kernels.gemm`).

(Under ``TRITON_INTERPRET=1``: the loop gets its trip count as a constexpr (``STEPS``), and bf16 dots
are done on float32 operands (``DOT_F32``), the interpreter's bf16 ``tl.dot`` being wrong.)
"""
from __future__ import annotations

from .gemv import HAS_TRITON

if HAS_TRITON:
    import triton.language as tl
else:  # pragma: no cover
    tl = None


def block_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, col_ptr, bp_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, sps, split_k, stride_xm, stride_ym, n_blocks,
    R: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, KG: tl.constexpr,
    STEPS: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    DOT_F32: tl.constexpr, FLOAT_Z: tl.constexpr, DEQ16: tl.constexpr,
):
    WPG: tl.constexpr = G // 8  # words per group
    BKW: tl.constexpr = KG * WPG  # words per row per step
    BK: tl.constexpr = BKW * 8  # input features per step
    QM: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    pid_k = tl.program_id(2)
    g_lo = tl.load(bp_ptr + blk)
    g_hi = tl.load(bp_ptr + blk + 1)
    # [words, 8, R] index tensors of the weight tile
    kw3 = tl.arange(0, BKW)[:, None, None]
    e3 = tl.arange(0, 8)[None, :, None]
    r3 = tl.arange(0, R)[None, None, :]
    shifts = e3 * BITS
    # [words, 8] index tensors of the activation tile
    kw2 = tl.arange(0, BKW)[:, None]
    t2 = (kw2 % WPG) * 8 + tl.arange(0, 8)[None, :]  # feature inside its group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    xrow = x_ptr + offs_m[:, None, None].to(tl.int64) * stride_xm
    if DOT:
        acc = tl.full([BLOCK_M, R], 0.0, tl.float32)
    else:
        acc3 = tl.full([BLOCK_M, BKW, R], 0.0, tl.float32)
    g_start = g_lo + pid_k * sps * KG
    for i in range(0, STEPS if STEPS > 0 else sps):
        g0 = g_start + i * KG
        gw3 = g0 + kw3 // WPG  # slot of each word, [BKW, 1, 1]
        ok3 = gw3 < g_hi
        wd = tl.load(qw_ptr + (g0 * WPG + kw3) * R + r3, mask=ok3, other=0)  # [BKW, 1, R]
        sc = tl.load(s_ptr + gw3 * R + r3, mask=ok3, other=0.0)
        zq = tl.load(z_ptr + gw3 * R + r3, mask=ok3, other=0)
        gw2 = g0 + kw2 // WPG
        ok2 = gw2 < g_hi
        col = tl.load(col_ptr + gw2, mask=ok2, other=0)  # [BKW, 1]
        feat = col * G + t2  # [BKW, 8]
        xm = m_ok[:, None, None] & (ok2 & (feat < K))[None, :, :]
        xt = tl.load(xrow + feat[None, :, :], mask=xm, other=0.0)  # [BLOCK_M, BKW, 8]

        q = (wd >> shifts) & QM  # [BKW, 8, R]
        if DOT:
            if DEQ16:  # 1024 + q and 1024 + z exactly in fp16; (q − z)·s rounded once
                zc = (zq.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                w = ((q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zc) * sc
            elif FLOAT_Z:
                w = (q.to(tl.float32) - zq.to(tl.float32)) * sc.to(tl.float32)
            else:  # 2^23 + q and 2^23 + z exactly
                zc = (zq.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
                w = ((q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - zc) * sc.to(tl.float32)
            w2 = tl.reshape(w.to(x_ptr.dtype.element_ty), [BK, R])
            x2 = tl.reshape(xt, [BLOCK_M, BK])
            if DOT_F32:
                acc = tl.dot(x2.to(tl.float32), w2.to(tl.float32), acc)
            else:
                acc = tl.dot(x2, w2, acc)
        else:  # GEMV: Σ_t x·(q − z) per word in float32 (q − z exact), times the scale once per word
            if FLOAT_Z:
                d = q.to(tl.float32) - zq.to(tl.float32)
            else:
                zc = (zq.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
                d = (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - zc
            part = tl.sum(xt.to(tl.float32)[:, :, :, None] * d[None, :, :, :], axis=2)  # [BLOCK_M, BKW, R]
            acc3 += part * tl.reshape(sc, [BKW, R]).to(tl.float32)[None, :, :]
    if not DOT:
        acc = tl.sum(acc3, axis=1)  # [BLOCK_M, R]

    offs_n = blk * R + tl.arange(0, R)
    n_ok = offs_n < N
    omask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.full([R], 0.0, tl.float32)
    yp = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT:
        wsp = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.atomic_add(wsp, acc, mask=omask)
        tl.debug_barrier()
        tile = pid_m * n_blocks + blk
        old = tl.atomic_add(cnt_ptr + tile, 1)
        if old == split_k - 1:  # the last contributor writes the tile and leaves zeros behind
            zero = tl.full([BLOCK_M, R], 0.0, tl.float32)
            tot = tl.where(omask, tl.atomic_add(wsp, zero, mask=omask), 0.0)
            tl.store(wsp, zero, mask=omask)
            tl.store(cnt_ptr + tile, 0)
            tl.store(yp, (tot + bias[None, :]).to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(yp, (acc + bias[None, :]).to(y_ptr.dtype.element_ty), mask=omask)
