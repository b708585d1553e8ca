"""Fused GQSA kernels (Triton) over the packed BSR layout of :mod:`gqsa.format`.

``y[B, N] = x[B, K] @ Ŵᵀ (+ bias)`` with ``Ŵ = s · (q − z)`` read straight from
``row_ptr / col_idx / qweight / scales / zeros``: every kept group is read once, pruned groups are
never touched, dequantization happens in registers in float32 and the products are accumulated in
float32.

Paths (entry points :func:`gqsa_linear` and, for repeated calls, :func:`prepare` → :class:`GemvPlan`):

* ``variant="task"`` — **task-centric** decode GEMV. The kept groups ``0 … nnz−1`` are cut into equal
  tasks of ``task_size`` groups, independent of row boundaries; one program per task, the grid sized
  to the GPU (:func:`build_task_table`, built once per layer and cacheable). A row lying entirely
  inside one task is reduced and stored directly; a row cut by task boundaries ("split row", at most
  two per task) is merged through an fp32 workspace with atomics, and the last task to arrive at that
  row (an atomic counter) writes it, adds the bias and resets the workspace for the next launch — one
  launch, no memset, safe to capture in a CUDA graph.
* ``variant="data"`` — the plain data-centric kernel, one program per output row (same kernel body).
  Up to ``V2_MAX_BATCH`` rows of x the ``kernel`` argument picks its implementation: ``"v1"`` (this kernel body) or ``"v2"``
  (:mod:`gqsa.kernels.gemv_layout`: a load-time metadata layout, one 32-bit word per kept group, and a
  kernel with a third fewer instructions per group, the weights read once for up to 4 rows of x); ``"auto"`` (``DEFAULT_KERNEL``) = v2 where it
  measured faster on the H200 (:func:`resolve_kernel`), v1 elsewhere.
* ``variant="dense"`` (prefill) — a Triton kernel expands the layer to a dense ``[N, K]`` weight in the
  activation dtype (bit-identical to ``reference.dequantize``), then cuBLAS through ``F.linear``.
* ``variant="auto"`` (default) — decode kernel for ≤ ``AUTO_KERNEL_MAX_BATCH`` (4) rows of x, dense
  above (the crossover measured on the H100, benchmarks/RESULTS.md); task-centric when a task table
  is passed or the rows are imbalanced (:func:`auto_variant`), data-centric for balanced rows.
* ``variant="reference"`` — :func:`gqsa.kernels.reference.linear`, the pure-torch ground truth; also
  what runs on the CPU unless ``TRITON_INTERPRET=1`` is set (then the Triton kernels run in the
  interpreter, which is how CI tests them).

Kernels support bits ∈ {2, 4, 8}, G ∈ {16, 32, 64, 128}, integer (uint8) and float16 zero points,
K not divisible by G (activations are zero-padded to whole groups in a copy, so x is never read out
of bounds), float16 / bfloat16 activations (float32 activations take the dense path). 3-bit layers
(codes straddle bytes) use the reference here; :class:`gqsa.kernels.dispatch.LinearPlan` (what
``GQSALinear`` runs on the GPU) serves them with the 4-bit kernels through :func:`kernel_packed`. The
4-bit integer-zero case (the default format) runs an inline-PTX dequantization (``GQSA_NO_ASM=1`` or
``gemv._ASM_ENABLED = False`` selects the plain-Triton path, which the interpreter always uses).

Work split inside a program: one thread per *unit* of ``UNIT_CODES`` (16) codes and their
activations (two 16-byte loads), accumulation in float32 per unit, then per row.

The interpreter/compiled choice is made when a kernel is first launched (not at import), per mode,
so importing this module before or after ``TRITON_INTERPRET`` is set does not matter. After the first
launch of a specialization the compiled kernel is called directly (``_launch``), which cuts Triton's
Python launch cost.
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .. import quant
from ..format import PackedLinear
from . import gemv_layout, reference
from .jit import _interpret, jitted, launch, rebind

try:  # triton is optional: without it every path falls back to the reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

MAX_DECODE_BATCH = 16  # the decode kernels run up to this many rows of x
AUTO_KERNEL_MAX_BATCH = 4  # variant="auto": decode kernel up to here, dense expansion + cuBLAS above (H100)
IMBALANCE = 2.0  # variant="auto": task-centric when the longest row holds > IMBALANCE × the mean
KERNEL_BITS = (2, 4, 8)  # code widths the kernels read; 3-bit layers are widened to 4 (kernel_packed)
VARIANTS = ("auto", "task", "data", "dense", "reference")
_WS_STRIDE = MAX_DECODE_BATCH  # fp32 workspace entries per split-row slot
# batch-1 data-centric kernel: "v1" (_gemv_kernel over the packed tensors), "v2" (gemv_layout: the
# load-time metadata layout, issue 12; runs where gemv_layout.layout_supported(packed), v1 elsewhere) or
# "auto": v2 on every W4 G16 and G64 layer the layout supports. v2's launch defaults (gemv_layout.launch) pick its
# kernel by row length: ≥ gemv_layout.LONG_ROW_GROUPS kept groups per row on average, one program per row
# (measured 8-13 % faster than v1: 4096×14336, 8192×28672, 4096×11008); shorter rows, the pipelined kernel
# (2 units per thread; rows spread over 24 programs per SM up to 16384 rows, else one row per program;
# measured 9-19 % faster than v1 on 4096², 11008×4096, 14336×4096, 8192², 11 % on 28672×8192).
# benchmarks/RESULTS.md, 2026-12-01 ("GEMV v2, pipelined", session 3).
# W4 G64 too (session 3, call 10: W4 S30 G64 7B end to end at batch 1, 438.5 tokens/s with v2 against 405.6 with
# v1); G32 and G128 were never timed with v2.
# At M = 1, fp16 activations, v2 runs the packed-fp16 dot with an fp32 redo of overflowed rows on W4 G16 layers of
# ≥ gemv_layout.HALF_MIN_CODES kept codes (every 7B/8B/70B projection but 4096²; 1-23 % faster, session 5) and W4
# G64 layers of ≥ HALF_WIDE_MIN_CODES (9-38 % faster, session 6; gemv_layout.half_dot_default); opt out with
# GQSA_GEMV_HALF=0 or v2_opts={"half_dot": False}. Session 7 (benchmarks/RESULTS.md "Session 7"): G128 (W4 S0
# G128, which 3-bit layers run as), v2 with the half dot 1.46-1.64× faster than v1 on five 7B/70B shapes (28672×8192
# 46.2 against 73.3 µs; tinygemm int4 g128 61.4); G32 (W4 S40 G32) 1.11-1.38× on six (1024×4096 3.96 against 4.38,
# 28672×8192 39.3 against 49.1; 7B end to end at batch 1 510.1 against 411.2 tokens/s), v2's fp32 dot within
# 0.93-1.04× of v1 there (what bf16 activations and layers below the half dot's threshold run).
AUTO_V2_GROUPS = (16, 32, 64, 128)
# rows of x the v2 kernel serves (its constexpr MB: the weights read and dequantized once for every row, the
# dot per row); v1 above. Chosen from the H200 measurement of issue gemvb (benchmarks/RESULTS.md, "GEMV v2
# at M = 2-4"), set by V2_MAX_BATCH ≤ gemv_layout.MAX_MB.
V2_MAX_BATCH = 4
KERNELS = ("auto", "v1", "v2")
DEFAULT_KERNEL = os.environ.get("GQSA_GEMV_KERNEL", "auto")


def resolve_kernel(packed: PackedLinear, kernel: str | None = None) -> str:
    """``"v1"`` or ``"v2"`` for the batch-1 data-centric path of ``packed`` (``kernel`` None: ``DEFAULT_KERNEL``)."""
    kernel = kernel or DEFAULT_KERNEL
    if kernel == "auto":
        ok = packed.bits == 4 and packed.group_size in AUTO_V2_GROUPS and gemv_layout.layout_supported(packed)
        return "v2" if ok else "v1"
    return kernel


# ============================================================================ kernels (plain python;
# jitted lazily by _kernel() so that the interpreter/compiled choice follows TRITON_INTERPRET at the
# time of the launch). They reference no other jit function, so each compiles on its own.


# Inline PTX for the 4-bit / integer-zero fast path (compiled mode only; the interpreter and other
# formats take the plain-Triton path below). A "unit" is 8 codes (one 32-bit word) and the 8
# activations they multiply (16 bytes). Code i sits at bits 4i. OR-ing a nibble into the mantissa of
# 2^23 (0x4B000000) at bit 0 or bit 4 gives 2^23 + q or 2^23 + 16q exactly; subtracting
# c0 = 2^23 + z or c4 = 2^23 + 16z (also exact, made the same way from the integer z) leaves q − z
# or 16(q − z): one LOP3 and one FADD per code, no integer-to-float conversion. The dot folds the
# odd codes' factor 16 back at the end.
_PTX_DEQ4 = """{
.reg .b32 m, t, u;
mov.b32 m, 0x4B000000;
lop3.b32 t, $8, 0xF, m, 0xEA;   sub.f32 $0, t, $9;
lop3.b32 t, $8, 0xF0, m, 0xEA;  sub.f32 $1, t, $10;
shr.u32 u, $8, 8;
lop3.b32 t, u, 0xF, m, 0xEA;    sub.f32 $2, t, $9;
lop3.b32 t, u, 0xF0, m, 0xEA;   sub.f32 $3, t, $10;
shr.u32 u, $8, 16;
lop3.b32 t, u, 0xF, m, 0xEA;    sub.f32 $4, t, $9;
lop3.b32 t, u, 0xF0, m, 0xEA;   sub.f32 $5, t, $10;
shr.u32 u, $8, 24;
lop3.b32 t, u, 0xF, m, 0xEA;    sub.f32 $6, t, $9;
lop3.b32 t, u, 0xF0, m, 0xEA;   sub.f32 $7, t, $10;
}"""
# y = Σ_even x·d + Σ_odd x·d / 16 over one unit; $1..$4: activation pairs (low half = even element)
_PTX_DOT_F16 = """{
.reg .b16 l, h;
.reg .f32 a, b, v;
mov.b32 {l, h}, $1;
cvt.f32.f16 v, l;  mul.rn.f32 a, v, $5;
cvt.f32.f16 v, h;  mul.rn.f32 b, v, $6;
mov.b32 {l, h}, $2;
cvt.f32.f16 v, l;  fma.rn.f32 a, v, $7, a;
cvt.f32.f16 v, h;  fma.rn.f32 b, v, $8, b;
mov.b32 {l, h}, $3;
cvt.f32.f16 v, l;  fma.rn.f32 a, v, $9, a;
cvt.f32.f16 v, h;  fma.rn.f32 b, v, $10, b;
mov.b32 {l, h}, $4;
cvt.f32.f16 v, l;  fma.rn.f32 a, v, $11, a;
cvt.f32.f16 v, h;  fma.rn.f32 b, v, $12, b;
fma.rn.f32 $0, b, 0f3D800000, a;
}"""
_PTX_DOT_BF16 = """{
.reg .b32 v;
.reg .f32 a, b;
shl.b32 v, $1, 16;          mul.rn.f32 a, v, $5;
and.b32 v, $1, 0xFFFF0000;  mul.rn.f32 b, v, $6;
shl.b32 v, $2, 16;          fma.rn.f32 a, v, $7, a;
and.b32 v, $2, 0xFFFF0000;  fma.rn.f32 b, v, $8, b;
shl.b32 v, $3, 16;          fma.rn.f32 a, v, $9, a;
and.b32 v, $3, 0xFFFF0000;  fma.rn.f32 b, v, $10, b;
shl.b32 v, $4, 16;          fma.rn.f32 a, v, $11, a;
and.b32 v, $4, 0xFFFF0000;  fma.rn.f32 b, v, $12, b;
fma.rn.f32 $0, b, 0f3D800000, a;
}"""


def _gemv_kernel(
    x_ptr, qw_ptr, col_ptr, s_ptr, z_ptr, rp_ptr, tab_ptr, need_ptr, ws_ptr, cnt_ptr, bias_ptr, y_ptr,
    N, nnz, task_size, stride_xb, stride_yb, B, one,
    G: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr,
    ROW_MODE: tl.constexpr, X_BF16: tl.constexpr, FLOAT_Z: tl.constexpr, USE_ASM: tl.constexpr,
    HAS_BIAS: tl.constexpr, WS_STRIDE: tl.constexpr, DEQ: tl.constexpr, DOT: tl.constexpr, UC: tl.constexpr,
    PDL: tl.constexpr,
):
    """Decode GEMV over packed groups; one program = one task (ROW_MODE False) or one row (True).

    Work unit = 8 consecutive codes of a group (``BITS`` bytes, ``qw_ptr`` views the codes as
    int{8·BITS}) and their 8 activations (16 bytes, ``x_ptr`` views x as int64, rows padded to whole
    groups); one thread per unit, G/8 threads per group, so every group's activations are read by
    one 16-byte load per thread and a warp's loads hit few L1 lines. The per-unit loads use the
    run-time stride ``one`` (== 1) so that the compiler keeps them in one unit-per-thread layout.
    """
    NU: tl.constexpr = G // UC  # units per group
    BLOCK_U: tl.constexpr = BLOCK_G * NU
    XG: tl.constexpr = G // 4  # int64 activation words per group
    XU: tl.constexpr = UC // 4  # int64 activation words per unit
    if USE_ASM:
        SCALE: tl.constexpr = 1.0
    else:
        SCALE: tl.constexpr = float(1 << BITS)
    QMASK: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    INV2: tl.constexpr = 1.0 / (1 << BITS)
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): x, y and the workspace after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if ROW_MODE:
        r = pid
        t0 = tl.load(rp_ptr + pid)
        t1 = tl.load(rp_ptr + pid + 1)
        r_hi = pid + 1
        slot_first = 0
        slot_last = 0
    else:
        t0 = pid * task_size
        t1 = tl.minimum(t0 + task_size, nnz)
        r = tl.load(tab_ptr + pid * 4)  # first row this task visits
        r_hi = tl.load(tab_ptr + pid * 4 + 1)  # one past the last
        slot_first = tl.load(tab_ptr + pid * 4 + 2)  # workspace slot of the first row if it is split
        slot_last = tl.load(tab_ptr + pid * 4 + 3)  # ... of the last row if it is split
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    ar = tl.arange(0, BLOCK_U) * one  # unit index within the chunk
    subx = (ar % NU) * XU  # first int64 activation word of the unit within its group
    pair = tl.arange(0, 2)
    xrow = x_ptr + offs_b[:, None, None] * stride_xb + pair[None, None, :]
    rs = tl.load(rp_ptr + r)
    re = tl.load(rp_ptr + r + 1)
    acc = tl.full([BLOCK_B, BLOCK_U], 0.0, tl.float32)

    # prefetch the first chunk's codes and metadata; each iteration issues the next chunk's loads
    # before computing on the current one
    g_n = t0 + ar // NU
    m_n = g_n < t1
    w_n = tl.load(qw_ptr + t0 * NU + ar, mask=m_n)
    col_n = tl.load(col_ptr + g_n, mask=m_n)
    s_n = tl.load(s_ptr + g_n, mask=m_n)
    z_n = tl.load(z_ptr + g_n, mask=m_n)
    c = t0
    while c < t1:  # (a while, not range(): the interpreter cannot loop over run-time bounds)
        offs_g = c + ar // NU  # group of each unit
        mg = offs_g < t1
        w = w_n
        col = col_n.to(tl.int32)
        sc = s_n.to(tl.float32) * SCALE
        zq = z_n
        g_n = offs_g + BLOCK_G
        m_n = g_n < t1
        w_n = tl.load(qw_ptr + (c + BLOCK_G) * NU + ar, mask=m_n)
        col_n = tl.load(col_ptr + g_n, mask=m_n)
        s_n = tl.load(s_ptr + g_n, mask=m_n)
        z_n = tl.load(z_ptr + g_n, mask=m_n)

        # each unit: UC codes and UC activations, read as UC/8 loads of 16 bytes ([BLOCK_B, BLOCK_U, 2]
        # int64 = 8 halves); r8 = Σ x·(q − z) over the unit (times 2^-BITS on the plain path)
        xbase = xrow + (col * XG + subx)[None, :, None]
        xmask = mask_b[:, None, None] & mg[None, :, None]
        r8 = tl.full([BLOCK_B, BLOCK_U], 0.0, tl.float32)
        if USE_ASM:
            # integer z < 16 in the low mantissa bits of 2^23: exactly 2^23 + z and 2^23 + 16z
            zi = zq.to(tl.int32)
            c0 = (zi | 0x4B000000).to(tl.float32, bitcast=True)
            c4 = ((zi << 4) | 0x4B000000).to(tl.float32, bitcast=True)
        else:
            cz = 1.0 + zq.to(tl.float32) * INV2
            if BITS * UC < 64:  # zero-extend the unit to int64
                wi = w.to(tl.int64) & ((1 << (BITS * UC)) - 1)
            else:
                wi = w.to(tl.int64)
        for h in tl.static_range(UC // 8):
            xv = tl.load(xbase + 2 * h, mask=xmask)
            xa, xb = tl.split(xv)
            x0 = xa.to(tl.int32)
            x1 = (xa >> 32).to(tl.int32)
            x2 = xb.to(tl.int32)
            x3 = (xb >> 32).to(tl.int32)
            if USE_ASM:  # BITS == 4: word h of the unit holds its codes 8h … 8h+7
                if UC == 8:
                    wh = w.to(tl.int32, bitcast=True)
                else:
                    wh = (w >> (32 * h)).to(tl.int32)
                d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                    DEQ, "=f,=f,=f,=f,=f,=f,=f,=f,r,f,f", [wh, c0, c4],
                    dtype=(tl.float32,) * 8, is_pure=True, pack=1)
                r8 += tl.inline_asm_elementwise(
                    DOT, "=f,r,r,r,r,f,f,f,f,f,f,f,f",
                    [x0, x1, x2, x3, d0[None, :], d1[None, :], d2[None, :], d3[None, :], d4[None, :],
                     d5[None, :], d6[None, :], d7[None, :]],
                    dtype=tl.float32, is_pure=True, pack=1)
            else:
                # generic: code i of the unit at bit i·BITS, moved to bit 23−BITS of 1.0f
                for e in tl.static_range(8):
                    if (8 * h + e) * BITS <= 23 - BITS:
                        mv = (wi << (23 - BITS - (8 * h + e) * BITS)).to(tl.int32)
                    else:
                        mv = (wi >> ((8 * h + e) * BITS - 23 + BITS)).to(tl.int32)
                    d = ((mv & QMASK) | 0x3F800000).to(tl.float32, bitcast=True) - cz  # (q − z)/2^BITS
                    if e < 2:
                        xw = x0
                    elif e < 4:
                        xw = x1
                    elif e < 6:
                        xw = x2
                    else:
                        xw = x3
                    xh = (xw >> (16 * (e % 2))).to(tl.int16)
                    if X_BF16:
                        xf = xh.to(tl.bfloat16, bitcast=True).to(tl.float32)
                    else:
                        xf = xh.to(tl.float16, bitcast=True).to(tl.float32)
                    r8 += xf * d[None, :]
        # masked lanes loaded nothing (garbage registers): select, never multiply, them away
        p = tl.where(mg[None, :], r8 * sc[None, :], 0.0)  # [BLOCK_B, BLOCK_U]

        # ---- rows ending inside this chunk: reduce and emit
        c_end = tl.minimum(c + BLOCK_G, t1)
        while (re <= c_end) & (r < r_hi):
            seg = (offs_g < re)[None, :]
            acc += tl.where(seg, p, 0.0)
            p = tl.where(seg, 0.0, p)
            v = tl.reduce(acc, 1, tl.standard._sum_combine)
            if HAS_BIAS:
                bv = tl.load(bias_ptr + r).to(tl.float32)
            else:
                bv = 0.0
            if (rs < t0) | (re > t1):  # split row: merge through the workspace
                slot = tl.where(rs < t0, slot_first, slot_last)
                tl.atomic_add(ws_ptr + slot * WS_STRIDE + offs_b, v, mask=mask_b)
                tl.debug_barrier()
                old = tl.atomic_add(cnt_ptr + slot, 1)
                if old == tl.load(need_ptr + slot) - 1:  # last contributor writes and resets
                    tot = tl.atomic_add(ws_ptr + slot * WS_STRIDE + offs_b, tl.full([BLOCK_B], 0.0, tl.float32), mask=mask_b)
                    tl.store(ws_ptr + slot * WS_STRIDE + offs_b, tl.full([BLOCK_B], 0.0, tl.float32), mask=mask_b)
                    tl.store(cnt_ptr + slot, 0)
                    tl.store(y_ptr + offs_b * stride_yb + r, (tot + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
            else:
                tl.store(y_ptr + offs_b * stride_yb + r, (v + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
            acc = tl.full([BLOCK_B, BLOCK_U], 0.0, tl.float32)
            r += 1
            rs = re
            re = tl.load(rp_ptr + r + 1, mask=r < N, other=0)
        acc += p
        c += BLOCK_G

    # rows not finished inside the loop: the last row if it continues in the next task, and
    # (last task, empty rows / empty layer) trailing empty rows
    while r < r_hi:
        v = tl.reduce(acc, 1, tl.standard._sum_combine)
        if HAS_BIAS:
            bv = tl.load(bias_ptr + r).to(tl.float32)
        else:
            bv = 0.0
        if (rs < t0) | (re > t1):
            slot = tl.where(rs < t0, slot_first, slot_last)
            tl.atomic_add(ws_ptr + slot * WS_STRIDE + offs_b, v, mask=mask_b)
            tl.debug_barrier()
            old = tl.atomic_add(cnt_ptr + slot, 1)
            if old == tl.load(need_ptr + slot) - 1:
                tot = tl.atomic_add(ws_ptr + slot * WS_STRIDE + offs_b, tl.full([BLOCK_B], 0.0, tl.float32), mask=mask_b)
                tl.store(ws_ptr + slot * WS_STRIDE + offs_b, tl.full([BLOCK_B], 0.0, tl.float32), mask=mask_b)
                tl.store(cnt_ptr + slot, 0)
                tl.store(y_ptr + offs_b * stride_yb + r, (tot + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
        else:
            tl.store(y_ptr + offs_b * stride_yb + r, (v + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
        acc = tl.full([BLOCK_B, BLOCK_U], 0.0, tl.float32)
        r += 1
        rs = re
        re = tl.load(rp_ptr + r + 1, mask=r < N, other=0)


def _expand_kernel(
    qw_ptr, col_ptr, s_ptr, z_ptr, rp_ptr, w_ptr, K, stride_w,
    G: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Dense expansion: program ``r`` writes row ``r`` of ``[N, K]``: zeros over the whole row, then (after a
    barrier, so that no zero lands on a kept weight) the kept groups. One pass over the dense matrix, no
    separate zero fill (its writes merge in L2: the matrix goes to DRAM once)."""
    QB: tl.constexpr = G * BITS // 8
    ZB: tl.constexpr = 1024
    r = tl.program_id(0)
    rs = tl.load(rp_ptr + r)
    re = tl.load(rp_ptr + r + 1)
    wrow = w_ptr + r.to(tl.int64) * stride_w
    offs_z = tl.arange(0, ZB)
    k0 = 0
    while k0 < K:  # (while: the interpreter cannot loop to a run-time bound with range)
        tl.store(wrow + k0 + offs_z, tl.full([ZB], 0.0, w_ptr.dtype.element_ty), mask=k0 + offs_z < K)
        k0 += ZB
    tl.debug_barrier()
    offs_e = tl.arange(0, G)
    offs_q = tl.arange(0, QB)
    ar = tl.arange(0, BLOCK_G)
    c = rs
    while c < re:
        offs_g = c + ar
        mg = offs_g < re
        qb = tl.load(qw_ptr + offs_g[:, None] * QB + offs_q[None, :], mask=mg[:, None], other=0)
        col = tl.load(col_ptr + offs_g, mask=mg, other=0).to(tl.int32)
        s = tl.load(s_ptr + offs_g, mask=mg, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_g, mask=mg, other=0).to(tl.float32)
        if BITS == 4:
            codes = tl.reshape(tl.join(qb & 0xF, qb >> 4), (BLOCK_G, G))
        elif BITS == 2:
            lo = tl.reshape(tl.join(qb & 3, (qb >> 4) & 3), (BLOCK_G, G // 2))
            hi = tl.reshape(tl.join((qb >> 2) & 3, qb >> 6), (BLOCK_G, G // 2))
            codes = tl.reshape(tl.join(lo, hi), (BLOCK_G, G))
        else:
            codes = qb
        w = (codes.to(tl.float32) - z[:, None]) * s[:, None]  # == reference: s·(q − z) in fp32
        kk = col[:, None] * G + offs_e[None, :]
        m = mg[:, None]
        if not EVEN_K:
            m = m & (kk < K)
        tl.store(wrow + kk, w.to(w_ptr.dtype.element_ty), mask=m)
        c += BLOCK_G


_KERNEL_SRC = {"gemv": _gemv_kernel, "expand": _expand_kernel}
_NO_SPECIALIZE = {"gemv": ["one"], "expand": []}
def _kernel(name: str):
    return jitted(_KERNEL_SRC[name], tuple(_NO_SPECIALIZE[name]))


# ============================================================================ task table


@dataclass
class TaskTable:
    """Work split of one layer for the task-centric kernel (build once, reuse every call).

    ``table[t] = (first_row, end_row, slot_first, slot_last)`` for task ``t`` covering the kept
    groups ``[t·task_size, min((t+1)·task_size, nnz))``; ``need[slot]`` is the number of tasks that
    contribute to split row ``slot``; ``workspace`` / ``counters`` are the self-cleaning merge buffers
    (all zero between launches). One table must not be used by two launches running concurrently
    on different streams.
    """

    table: torch.Tensor  # int32 [T, 4]
    need: torch.Tensor  # int32 [S]
    workspace: torch.Tensor  # float32 [S, 16]
    counters: torch.Tensor  # int32 [S]
    task_size: int
    block_g: int
    num_warps: int
    unit_codes: int
    num_tasks: int
    num_split_rows: int
    shape: tuple[int, int]
    nnz: int

    @property
    def device(self) -> torch.device:
        return self.table.device


# launch defaults (H100 sweep, benchmarks/NOTES-gemv.md); build_task_table / the data-centric launch
# read them when not given explicitly
TASK_DEFAULTS = {"tasks_per_sm": 16, "num_warps": 2, "units_per_thread": 4}


def default_block_g(group_size: int, num_warps: int = 4, units_per_thread: int = 2, unit_codes: int = 8) -> int:
    """Groups per chunk: ``units_per_thread`` units of ``unit_codes`` codes per thread."""
    return max(1, 32 * num_warps * units_per_thread * unit_codes // group_size)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def build_task_table(
    packed: PackedLinear,
    task_size: int | None = None,
    tasks_per_sm: int | None = None,
    block_g: int | None = None,
    num_warps: int | None = None,
    units_per_thread: int | None = None,
    unit_codes: int | None = None,
    min_task_chunks: int = 2,
    device: torch.device | str | None = None,
) -> TaskTable:
    """Cut the kept groups of ``packed`` into equal tasks and precompute each task's rows.

    ``task_size`` (groups per task, rounded up to a multiple of ``block_g``) defaults to
    ``nnz / (tasks_per_sm · #SMs)``, at least ``min_task_chunks`` chunks, so the grid fills the GPU
    about ``tasks_per_sm`` programs deep. Host-side work plus one copy to the device: call it at load
    time, not per forward.
    """
    device = torch.device(device) if device is not None else packed.row_ptr.device
    n = packed.shape[0]
    nnz = packed.nnz
    tasks_per_sm = tasks_per_sm or TASK_DEFAULTS["tasks_per_sm"]
    num_warps = num_warps or TASK_DEFAULTS["num_warps"]
    units_per_thread = units_per_thread or TASK_DEFAULTS["units_per_thread"]
    uc = unit_codes or _unit_codes(packed)
    if packed.bits > 4:
        uc = 8
    if block_g is None:
        block_g = default_block_g(packed.group_size, num_warps, units_per_thread, uc)
    if block_g < 1 or block_g & (block_g - 1):
        raise ValueError(f"block_g must be a positive power of two, got {block_g}")
    if task_size is None:
        target = max(1, tasks_per_sm * _num_sms(device))
        task_size = max(min_task_chunks * block_g, math.ceil(nnz / target))
    task_size = max(block_g, math.ceil(task_size / block_g) * block_g)
    num_tasks = max(1, math.ceil(nnz / task_size))

    rp = packed.row_ptr.detach().to("cpu", torch.int64)
    t0 = torch.arange(num_tasks, dtype=torch.int64) * task_size
    t1 = torch.clamp(t0 + task_size, max=nnz)
    # first row: the one holding group t0, or an empty row sitting at position t0 before it
    first_a = torch.searchsorted(rp[1:], t0, right=True)  # first r with rp[r+1] > t0
    first_b = torch.searchsorted(rp[:-1], t0, right=False)  # first r with rp[r] >= t0
    r_lo = torch.minimum(first_a, first_b)
    if nnz > 0:
        row_of_last = torch.searchsorted(rp, t1 - 1, right=True) - 1  # row holding group t1-1
        r_hi = row_of_last + 1
        row_of_first = torch.searchsorted(rp, t0, right=True) - 1  # row holding group t0
    else:
        r_hi = torch.zeros_like(t0)
        row_of_last = row_of_first = torch.zeros_like(t0)
    r_hi[-1] = n  # trailing empty rows go to the last task
    r_lo[0] = 0

    def is_split(rows):
        return (rp[rows] < t0) | (rp[rows + 1] > t1)

    if nnz > 0:
        fs, ls = is_split(row_of_first), is_split(row_of_last)
        split_rows = torch.unique(torch.cat([row_of_first[fs], row_of_last[ls]]))
    else:
        fs = ls = torch.zeros(num_tasks, dtype=torch.bool)
        split_rows = torch.zeros(0, dtype=torch.int64)
    slot_of = lambda rows: torch.searchsorted(split_rows, rows)  # noqa: E731
    slot_first = torch.where(fs, slot_of(row_of_first), torch.full_like(t0, -1))
    slot_last = torch.where(ls, slot_of(row_of_last), torch.full_like(t0, -1))
    need = (rp[split_rows + 1] - 1) // task_size - rp[split_rows] // task_size + 1
    table = torch.stack([r_lo, r_hi, slot_first, slot_last], dim=1).to(torch.int32)
    s = max(1, split_rows.numel())
    return TaskTable(
        table=table.to(device),
        need=need.to(torch.int32).to(device) if split_rows.numel() else torch.ones(1, dtype=torch.int32, device=device),
        workspace=torch.zeros(s, _WS_STRIDE, dtype=torch.float32, device=device),
        counters=torch.zeros(s, dtype=torch.int32, device=device),
        task_size=int(task_size),
        block_g=int(block_g),
        num_warps=int(num_warps),
        unit_codes=int(uc),
        num_tasks=int(num_tasks),
        num_split_rows=int(split_rows.numel()),
        shape=tuple(int(v) for v in packed.shape),
        nnz=int(nnz),
    )


_TABLE_CACHE: dict = {}
_BALANCE_CACHE: dict = {}


def auto_variant(packed: PackedLinear) -> str:
    """``"task"`` when the kept groups are unevenly spread over rows (the longest row holds more
    than ``IMBALANCE`` × the mean), else ``"data"``: on balanced layers the row-per-program kernel
    has no split rows to merge and measured as fast or faster (benchmarks/RESULTS.md). Memoized on
    the identity of ``row_ptr`` (one host sync the first time)."""
    rp = packed.row_ptr
    hit = _BALANCE_CACHE.get(id(rp))
    if hit is not None and hit[0]() is rp and hit[1] == rp._version:
        return hit[2]
    counts = (rp[1:] - rp[:-1]).to(torch.float32)
    mean = float(counts.mean()) if counts.numel() else 0.0
    v = "task" if counts.numel() and float(counts.max()) > IMBALANCE * max(mean, 1.0) else "data"
    _BALANCE_CACHE[id(rp)] = (weakref.ref(rp), rp._version, v)
    return v



def cached_task_table(packed: PackedLinear, **kw) -> TaskTable:
    """:func:`build_task_table`, memoized on the identity (and in-place version) of ``row_ptr``."""
    rp = packed.row_ptr
    key = (id(rp), tuple(sorted(kw.items())))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        ref, version, nnz, tab = hit
        if ref() is rp and version == rp._version and nnz == packed.nnz and tab.shape == tuple(packed.shape):
            return tab
    tab = build_task_table(packed, **kw)
    _TABLE_CACHE[key] = (weakref.ref(rp), rp._version, packed.nnz, tab)
    if len(_TABLE_CACHE) > 4096:  # drop entries whose layer is gone
        for k in [k for k, v in _TABLE_CACHE.items() if v[0]() is None]:
            del _TABLE_CACHE[k]
    return tab


# ============================================================================ checks


def _check_packed(packed: PackedLinear) -> None:
    if not isinstance(packed, PackedLinear):
        raise ValueError(f"packed must be a gqsa.format.PackedLinear, got {type(packed).__name__}")
    n, k = packed.shape
    g, b = packed.group_size, packed.bits
    want = {"row_ptr": ((n + 1,), (torch.int32,)), "col_idx": (None, (torch.int16,)),
            "qweight": (None, (torch.uint8,)), "scales": (None, (torch.float16,)),
            "zeros": (None, (torch.uint8, torch.float16))}
    dev = packed.row_ptr.device
    nnz = packed.col_idx.numel()
    for name, (shape, dtypes) in want.items():
        t = getattr(packed, name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"packed.{name} is not a tensor")
        if t.dtype not in dtypes:
            raise ValueError(f"packed.{name} has dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}")
        if t.device != dev:
            raise ValueError(f"packed.{name} is on {t.device} but row_ptr is on {dev}")
        if not t.is_contiguous():
            raise ValueError(f"packed.{name} must be contiguous")
    if packed.row_ptr.shape != (n + 1,):
        raise ValueError(f"packed.row_ptr has shape {list(packed.row_ptr.shape)}, expected [{n + 1}]")
    if packed.qweight.shape != (nnz, g * b // 8):
        raise ValueError(f"packed.qweight has shape {list(packed.qweight.shape)}, expected [{nnz}, {g * b // 8}]")
    for name in ("scales", "zeros"):
        if getattr(packed, name).shape != (nnz,):
            raise ValueError(f"packed.{name} has shape {list(getattr(packed, name).shape)}, expected [{nnz}]")
    if nnz * max(1, g * b // 8) >= 2**31 or n * k >= 2**31:
        raise ValueError(f"layer too large for 32-bit offsets (nnz={nnz}, shape={list(packed.shape)})")


def _check_x(x: torch.Tensor, packed: PackedLinear, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.dim() < 1 or x.shape[-1] != packed.shape[1]:
        raise ValueError(f"x has shape {list(x.shape)}; its last dimension must be in_features={packed.shape[1]}")
    if x.device != packed.row_ptr.device:
        raise ValueError(f"x is on {x.device} but the packed layer is on {packed.row_ptr.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (packed.shape[0],):
            raise ValueError(f"bias must be a tensor of shape [{packed.shape[0]}], got "
                             f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if not bias.is_floating_point():
            raise ValueError(f"bias has dtype {bias.dtype}; expected a floating dtype")


def _triton_usable(device: torch.device) -> bool:
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpret()


# ============================================================================ launchers


_DUMMIES: dict = {}


def _dummy_f32(device) -> torch.Tensor:
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.zeros(_WS_STRIDE, dtype=torch.float32, device=device)
    return t


def _x_words(x2: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """Activations ``[B, K]`` as int64 words ``[B, C·G/4]`` (4 halves each), zero-padded to whole
    groups so that the kernel never reads past K: a view when K % G == 0 and rows are 8-byte aligned,
    else a padded copy."""
    bsz, k = x2.shape
    kp = packed.n_group_cols * packed.group_size
    if (kp != k or x2.stride(1) != 1 or x2.stride(0) % 4 or x2.data_ptr() % 8
            or (bsz > 1 and x2.stride(0) < k)):
        xp = torch.zeros(bsz, kp, dtype=x2.dtype, device=x2.device)
        xp[:, :k] = x2
        x2 = xp
    return x2.view(torch.int64)


_UNIT_DTYPE = {(2, 8): torch.int16, (4, 8): torch.int32, (8, 8): torch.int64, (2, 16): torch.int32,
               (4, 16): torch.int64}
UNIT_CODES = 16  # codes per thread unit (16 for bits ≤ 4 halves the per-unit overhead, doubles x wavefronts)


def _unit_codes(packed: PackedLinear) -> int:
    return UNIT_CODES if packed.bits <= 4 else 8


def _qweight_units(packed: PackedLinear, uc: int | None = None) -> torch.Tensor:
    """Codes viewed as one integer per unit of ``uc`` codes: ``[nnz · G/uc]``."""
    q = packed.qweight
    dt = _UNIT_DTYPE[(packed.bits, uc or _unit_codes(packed))]
    if q.numel() == 0:  # a zero-size view cannot always change dtype; the kernel reads nothing
        return torch.zeros(1, dtype=dt, device=q.device)
    return q.reshape(-1).view(dt)


def _use_asm(packed: PackedLinear) -> bool:
    return packed.bits == 4 and not packed.float_zeros and not _interpret() and _ASM_ENABLED


_ASM_ENABLED = os.environ.get("GQSA_NO_ASM", "0") != "1"


DATA_NUM_WARPS = 1  # data-centric defaults (one program per row)
DATA_UNITS_PER_THREAD = 2

def _launch_gemv(x2, packed, bias, y, tasks: TaskTable | None, block_g=None, num_warps=None, qw=None,
                 unit_codes=None):
    """``tasks`` given: task-centric launch; None: data-centric (one program per row)."""
    bsz, k = x2.shape
    n = packed.shape[0]
    bpad = _next_pow2(bsz)
    xw = _x_words(x2, packed)
    uc = tasks.unit_codes if tasks is not None else (unit_codes or _unit_codes(packed))
    if packed.bits > 4:
        uc = 8
    if qw is None:
        qw = _qweight_units(packed, uc)
    if tasks is not None:
        block_g = tasks.block_g
        num_warps = tasks.num_warps
        if bpad > 1:  # one unit per thread: the [B, units] tiles grow with the batch
            block_g = min(block_g, default_block_g(packed.group_size, num_warps, 1, uc))
        grid = (tasks.num_tasks,)
        tab, need, ws, cnt, task_size = tasks.table, tasks.need, tasks.workspace, tasks.counters, tasks.task_size
    else:
        num_warps = num_warps or DATA_NUM_WARPS
        if block_g is None:
            block_g = default_block_g(packed.group_size, num_warps, DATA_UNITS_PER_THREAD if bpad == 1 else 1, uc)
            avg = max(1, packed.nnz // max(1, n))
            block_g = max(1, min(block_g, _next_pow2(avg)))
        grid = (n,)
        tab = need = cnt = packed.row_ptr
        ws = _dummy_f32(y.device)
        task_size = 0
    bf16 = x2.dtype == torch.bfloat16
    consts = dict(G=packed.group_size, BITS=packed.bits, BLOCK_G=block_g, BLOCK_B=bpad, ROW_MODE=tasks is None,
                  X_BF16=bf16, FLOAT_Z=packed.float_zeros, USE_ASM=_use_asm(packed), HAS_BIAS=bias is not None,
                  WS_STRIDE=_WS_STRIDE, DEQ=_PTX_DEQ4, DOT=_PTX_DOT_BF16 if bf16 else _PTX_DOT_F16, UC=uc)
    tensors = (xw, qw, packed.col_idx, packed.scales, packed.zeros, packed.row_ptr, tab, need, ws, cnt,
               bias if bias is not None else packed.row_ptr, y)
    ints = (n, packed.nnz, task_size, xw.stride(0), y.stride(0), bsz, 1)
    launch(_kernel("gemv"), grid, (*tensors, *ints), consts, y.device, num_warps, pdl="gemv", rows=bsz)


def kernel_packed(packed: PackedLinear) -> PackedLinear:
    """The layer in a code width the kernels read: 3-bit codes (which straddle bytes) widened to 4 bits, the same
    integers with the same scales and zero points, hence the same weights bit for bit; other layers as they are.
    The widened codes take 4/3 of the stored bytes on the device (W3 G128: 4.31 instead of 3.38 bits/weight)."""
    if packed.bits != 3:
        return packed
    return replace(packed, qweight=quant.repack_codes(packed.qweight, 3, 4, packed.group_size), bits=4)


def dequantize_dense(packed: PackedLinear, dtype: torch.dtype = torch.float16,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype``, equal bit for bit to ``reference.dequantize(packed, dtype)``.

    Triton expansion kernel on the GPU (or under ``TRITON_INTERPRET=1``), the reference elsewhere.
    ``out``: a ``[N, K]`` tensor of ``dtype`` with unit stride along K to write (every element; its
    previous content does not matter), else a new one.
    """
    _check_packed(packed)
    dev = packed.row_ptr.device
    n, k = packed.shape
    if out is not None and (tuple(out.shape) != (n, k) or out.dtype != dtype or out.device != dev
                            or out.stride(1) != 1):
        raise ValueError(f"out must be a [{n}, {k}] {dtype} tensor on {dev} with unit stride along K")
    if packed.bits not in KERNEL_BITS or not _triton_usable(dev):
        w = reference.dequantize(packed, dtype)
        return w if out is None else out.copy_(w)
    w = torch.empty(n, k, dtype=dtype, device=dev) if out is None else out  # every element is written
    if n:
        launch(_kernel("expand"), (n,), _expand_args(packed, w), _expand_consts(packed), dev, 4)
    return w


def _expand_args(packed: PackedLinear, w: torch.Tensor) -> tuple:
    return (packed.qweight, packed.col_idx, packed.scales, packed.zeros, packed.row_ptr, w, packed.shape[1], w.stride(0))


def _expand_consts(packed: PackedLinear) -> dict:
    return dict(G=packed.group_size, BITS=packed.bits, BLOCK_G=max(4, 1024 // packed.group_size),
                EVEN_K=packed.shape[1] % packed.group_size == 0)


class DenseCall:
    """The per-call dense expansion + cuBLAS (``gqsa_linear(..., variant="dense")``) of a validated layer
    (:func:`_check_packed`) with the expansion's launch bound after its first (the dense weight is always
    new, so its specialization never changes): ``call(x2, bias, y)`` writes ``y = x2 @ Ŵᵀ (+ bias)`` for
    ``x2`` ``[M, K]`` fp16/bf16, ``y`` contiguous ``[M, N]`` and ``bias`` None or contiguous ``[N]``, all in
    one dtype on the layer's device (what :class:`gqsa.kernels.dispatch.LinearPlan` checked)."""

    def __init__(self, packed: PackedLinear):
        self.packed, self.consts, self.kern, self._bound = packed, _expand_consts(packed), _kernel("expand"), None

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        p = self.packed
        w = torch.empty(p.shape, dtype=x2.dtype, device=x2.device)
        if p.shape[0]:
            self._bound = rebind(self._bound, True, self.kern, (p.shape[0],), _expand_args(p, w), self.consts,
                                 w.device, 4)
        if bias is None:
            return torch.mm(x2, w.t(), out=y)
        return torch.addmm(bias, x2, w.t(), out=y)


def _into(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    if out is None:
        return y
    out.copy_(y)
    return out


def gqsa_linear(
    x: torch.Tensor,
    packed: PackedLinear,
    bias: torch.Tensor | None = None,
    tasks: TaskTable | None = None,
    variant: str = "auto",
    out: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """``x @ Ŵᵀ (+ bias)`` for a packed GQSA layer; ``x`` is ``[..., K]``, the result ``[..., N]`` in
    ``x``'s dtype.

    ``variant``: ``"auto"`` (decode kernel for ≤ ``AUTO_KERNEL_MAX_BATCH`` rows of ``x`` — task-centric
    if ``tasks`` is given or the rows are imbalanced (:func:`auto_variant`), else data-centric — and
    dense expansion + cuBLAS above), ``"task"``, ``"data"``, ``"dense"`` or ``"reference"``.
    ``"task"``/``"data"`` with more than 16 rows fall through to ``"dense"``. ``tasks``: the layer's :class:`TaskTable` from
    :func:`build_task_table` (built and memoized here when omitted; pass it to skip the lookup).
    ``kernel``: ``"auto"`` / ``"v1"`` / ``"v2"`` for the data-centric variant up to ``V2_MAX_BATCH`` rows (default
    ``DEFAULT_KERNEL``, :func:`resolve_kernel`; v2 = :mod:`gqsa.kernels.gemv_layout`, used where its layout
    supports the layer, built and memoized here when needed). Without a usable Triton (CPU without ``TRITON_INTERPRET=1``, triton missing,
    3-bit layers) the reference runs. Bad inputs raise ``ValueError`` naming the problem.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}': use one of {VARIANTS}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}': use one of {KERNELS}")
    _check_packed(packed)
    _check_x(x, packed, bias)
    n, k = packed.shape
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    bsz = x2.shape[0]
    dev = x.device
    if out is not None and (out.shape != (*lead, n) or out.dtype != x.dtype or out.device != dev
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {[*lead, n]} on {dev}")
    if variant == "reference" or packed.bits not in KERNEL_BITS or not _triton_usable(dev):
        return _into(out, reference.linear(x, packed, bias))
    if bsz == 0:
        return out if out is not None else x.new_empty(*lead, n)
    if variant == "auto":
        variant = ("task" if tasks is not None else auto_variant(packed)) if bsz <= AUTO_KERNEL_MAX_BATCH \
            else "dense"
    if bsz > MAX_DECODE_BATCH and variant in ("task", "data"):
        variant = "dense"
    if x.dtype == torch.float32 and variant in ("task", "data"):
        variant = "dense"  # the decode kernels read 16-bit activations
    if variant == "dense":
        return _into(out, F.linear(x, dequantize_dense(packed, x.dtype), bias))
    if x2.stride(-1) != 1 or (bsz > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if out is not None:
        y = out.view(bsz, n)
    else:
        y = torch.empty(bsz, n, dtype=x.dtype, device=dev)
    if variant == "task":
        if tasks is None:
            tasks = cached_task_table(packed)
        if not isinstance(tasks, TaskTable):
            raise ValueError(f"tasks must be a TaskTable from build_task_table, got {type(tasks).__name__}")
        if tasks.shape != tuple(packed.shape) or tasks.nnz != packed.nnz:
            raise ValueError(f"task table was built for shape {list(tasks.shape)} with nnz={tasks.nnz}, "
                             f"not this layer ({list(packed.shape)}, nnz={packed.nnz})")
        if tasks.device != dev:
            raise ValueError(f"task table is on {tasks.device} but x is on {dev}")
        _launch_gemv(x2, packed, bias, y, tasks)
    else:
        lay = gemv_layout.cached_layout(packed) if bsz <= V2_MAX_BATCH and resolve_kernel(packed, kernel) == "v2" \
            else None
        if lay is not None:
            gemv_layout.launch(x2, packed, lay, bias, y, asm=_ASM_ENABLED)
        else:
            _launch_gemv(x2, packed, bias, y, None)
    return y.view(*lead, n)


class GemvPlan:
    """A packed layer prepared once for repeated calls (what ``GQSALinear`` should hold).

    Validates the layer, picks the variant (``"auto"``: :func:`auto_variant`), builds the task table
    and the code-word view at construction; a call checks only ``x`` / ``bias`` (dtype, last
    dimension, device) and launches, with the batch-size dispatch of :func:`gqsa_linear` (decode
    kernel for ≤ ``max_kernel_batch`` rows — ``AUTO_KERNEL_MAX_BATCH`` for ``"auto"``, 16 otherwise —
    dense expansion + cuBLAS above). Up to ``V2_MAX_BATCH`` rows on the data-centric variant it runs the kernel that
    :func:`resolve_kernel` picks (v2 holds a load-time layout, ``self.layout``: 4 more bytes per kept
    group). Rebuild it when the layer's tensors change or move. CUDA-graph capturable once warmed up
    (first call compiles).
    """

    def __init__(self, packed: PackedLinear, variant: str = "auto", tasks: TaskTable | None = None,
                 kernel: str | None = None, v2_opts: dict | None = None, **table_kw):
        if variant not in ("auto", "task", "data"):
            raise ValueError(f"a plan runs variant 'auto', 'task' or 'data', got '{variant}'")
        if (kernel or DEFAULT_KERNEL) not in KERNELS:
            raise ValueError(f"unknown kernel '{kernel}': use one of {KERNELS}")
        _check_packed(packed)
        self.max_kernel_batch = AUTO_KERNEL_MAX_BATCH if variant == "auto" else MAX_DECODE_BATCH
        if variant == "auto":
            variant = "task" if tasks is not None else auto_variant(packed)
        self.packed, self.variant = packed, variant
        self.device = packed.row_ptr.device
        self.kernel_ok = packed.bits in KERNEL_BITS and _triton_usable(self.device)
        self.tasks = None
        if variant == "task":
            self.tasks = tasks if tasks is not None else build_task_table(packed, **table_kw)
            if self.tasks.shape != tuple(packed.shape) or self.tasks.nnz != packed.nnz:
                raise ValueError("task table does not belong to this layer")
        self.qw = None
        if packed.bits in KERNEL_BITS:
            self.qw = _qweight_units(packed, self.tasks.unit_codes if self.tasks is not None else None)
        # ≤ V2_MAX_BATCH rows, data-centric: the v2 kernel's load-time layout (None: v1)
        self.kernel = kernel = resolve_kernel(packed, kernel)
        self.v2_opts = dict(v2_opts or {})  # launch arguments of gemv_layout.launch (tuning knobs)
        self.layout = None
        if kernel == "v2" and variant == "data" and self.kernel_ok:
            self.layout = gemv_layout.build_layout(packed)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None):
        p = self.packed
        n, k = p.shape
        if x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] != k or x.device != self.device \
                or (bias is not None and (bias.shape != (n,) or bias.device != self.device)) or out is not None:
            return gqsa_linear(x, p, bias, tasks=self.tasks, variant=self.variant, out=out)
        x2 = x.reshape(-1, k)
        bsz = x2.shape[0]
        if bsz > self.max_kernel_batch:
            return gqsa_linear(x, p, bias, variant="dense")
        if not self.kernel_ok or bsz == 0:
            return gqsa_linear(x, p, bias, tasks=self.tasks, variant=self.variant)
        if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
            bias = bias.to(x.dtype).contiguous()
        y = torch.empty(bsz, n, dtype=x.dtype, device=x.device)
        if bsz <= V2_MAX_BATCH and self.layout is not None:
            gemv_layout.launch(x2, p, self.layout, bias, y, **({"asm": _ASM_ENABLED} | self.v2_opts))
        else:
            _launch_gemv(x2, p, bias, y, self.tasks, qw=self.qw)
        return y.view(*x.shape[:-1], n)

    def v2_call(self, x2: torch.Tensor, has_bias: bool) -> gemv_layout.V2Call | None:
        """The v2 launch of this plan for calls like ``x2`` (``[M, K]`` fp16/bf16 on the plan's device;
        with or without a bias; y contiguous) as a :class:`gemv_layout.V2Call` to keep, or None where
        :meth:`__call__` would not run v2 on it as it is."""
        bsz = x2.shape[0]
        if (not self.kernel_ok or self.layout is None or not 1 <= bsz <= min(V2_MAX_BATCH, self.max_kernel_batch)
                or not gemv_layout.V2Call.takes(self.packed, x2)):
            return None
        return gemv_layout.V2Call(self.packed, self.layout, bsz, x2.dtype, has_bias, x2.stride(0), self.packed.shape[0],
                                  x2.device, **({"asm": _ASM_ENABLED} | self.v2_opts))


def prepare(packed: PackedLinear, variant: str = "auto", tasks: TaskTable | None = None, kernel: str | None = None,
            v2_opts: dict | None = None, **table_kw) -> GemvPlan:
    """:class:`GemvPlan` for ``packed`` (``table_kw`` go to :func:`build_task_table`; ``kernel``: ``"auto"``,
    ``"v1"`` or ``"v2"`` for ≤ ``V2_MAX_BATCH`` rows on the data-centric variant, default ``DEFAULT_KERNEL``; ``v2_opts``:
    keyword arguments of :func:`gemv_layout.launch` for the v2 kernel, e.g. ``units_per_thread``)."""
    return GemvPlan(packed, variant, tasks, kernel, v2_opts, **table_kw)
