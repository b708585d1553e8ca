"""Tensor-core GQSA GEMM (Triton ``tl.dot``) over the load-time :class:`~gqsa.kernels.layout.TileLayout`.

``y[M, N] = x[M, K] @ Ŵᵀ (+ bias)``, computed transposed: one program accumulates a ``BLOCK_N × BLOCK_M``
tile of ``yᵀ = Ŵ xᵀ`` (the weights are the tensor cores' A operand, so ``BLOCK_N`` output rows fill its M
dimension and a handful of tokens its N dimension) over a range of k-tiles (all of them, or ``1/split_k``
of them). Per k-tile it reads one metadata word per row (first kept group and kept-group mask), computes
where every kept group sits (a popcount of the mask bits below it), gathers the kept groups' code bytes
and ``sz`` words — one read of the packed weights per output tile, shared by all ``BLOCK_M`` rows of x —
and dequantizes them in registers into dense ``BLOCK_N × (BLOCK_K·bits/8)`` tiles, one per *plane* of
the codes (layout version 2: plane ``j`` of a group's bytes holds ``G·bits/8`` consecutive features), zeros
where a group is pruned (its scale loads as 0). The weight is ``s · (q − z)`` in float32 rounded to the
activation dtype — or, for fp16 activations with integer zeros, in fp16, where ``q − z`` is exact and the
product is rounded once: the same value (``ASM``: ``1024 + q`` by the inline PTX of
:mod:`gqsa.kernels.block_kernels`, also exact) — so each tile is ``reference.dequantize``'s by
construction; the tests compare y with the tolerances of the GEMV's. Each plane's tile meets the matching
rows of ``xᵀ`` in a ``tl.dot`` accumulating in float32. (Triton's interpreter rounds float32 → bfloat16
differently and its bf16 ``tl.dot`` is wrong: under ``TRITON_INTERPRET=1`` bf16 tiles are multiplied in
float32, ``DOT_F32``.)

Cost (``benchmarks/gemm_sass.py``, sm_90, W4 G16 fp16): 5.0 SASS instructions per dense weight of the tile,
pruned ones included, at the M ≤ 16 configuration (BLOCK_N = 128, 4 warps, 128 registers); the first revision
(codes in canonical order, dequantized by shifts into one ``BLOCK_K``-wide tile) took 12. On the H200 it is
latency-bound at 4 programs per SM (benchmarks/RESULTS.md, "Session 6").

Split-K (``split_k > 1``, for small M where the output tiles alone cannot fill the GPU): every
program adds its partial tile into a float32 workspace with atomics; the last program to finish a
tile (an atomic counter per tile) reads the sum (an atomic add of 0) and zeroes the workspace, adds
the bias, writes y and resets the counter. One launch, no memset, CUDA-graph capturable; the
workspace and counters are all zero between launches.

The launcher (:func:`launch_gemm`) takes its tuning knobs as a :class:`GemmConfig` argument; the
table of configurations by batch size measured on the H200 lives in :mod:`gqsa.kernels.dispatch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .block_kernels import NIB2H
from .gemv import HAS_TRITON
from .jit import _interpret, aligned16, jitted, rebind
from .layout import ROW_BLOCK, TileLayout

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .gemv_layout import PREFL2  # L2 prefetch of one line (inline PTX)
else:  # pragma: no cover
    triton = tl = None


def _positions(meta, kb, jw, below, jw1, below1, ASM: tl.constexpr, HALVES: tl.constexpr):
    """Where each of a row's k-tile columns sits among the layer's kept groups, and whether the row keeps it:
    ``meta`` ``[BLOCK_N, 1, 1]`` words ``first << 8 | mask``, ``kb`` the k-tile's first group, ``jw`` ``[1, KH, 1]``
    the columns of the first column set, ``below`` their lower mask bits (``jw1``, ``below1``: the second set's,
    with ``HALVES``) → ``(kb + first + popcount(mask & below), mask bit)`` ``[BLOCK_N, KH, 1]`` of the first set,
    then of the second (without ``HALVES`` the first set's again); ``popc`` by inline PTX with ``ASM``, else SWAR on
    the 8-bit mask."""
    mk = meta & 0xFF
    out = ()
    for h in tl.static_range(2 if HALVES else 1):
        bl = below1 if h == 1 else below
        if ASM:
            c = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [mk & bl], dtype=tl.int32, is_pure=True,
                                          pack=1)
        else:
            c = mk & bl
            c = c - ((c >> 1) & 0x55)
            c = (c & 0x33) + ((c >> 2) & 0x33)
            c = (c + (c >> 4)) & 0x0F
        out = out + (kb + (meta >> 8) + c, ((mk >> (jw1 if h == 1 else jw)) & 1) != 0)
    if not HALVES:
        out = out + out
    return out


def _dot_cols(acc, b, sv, zv, xm, m_ok, kbase, K, kp0, G: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_M: tl.constexpr, KP: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
              FLOAT_Z: tl.constexpr, DEQ16: tl.constexpr, ASM: tl.constexpr, CANON: tl.constexpr):
    """``acc`` plus the product of some group columns of a k-tile with the matching rows of xᵀ: ``b`` their
    ``[BLOCK_N, C, GB]`` code bytes; ``sv`` ``[BLOCK_N, C, 1]`` their scale|zero words (0 where pruned; ``CANON``:
    their fp16 scales, ``zv`` their zero points); ``kp0`` ``[KP]`` the feature of plane 0 at each k of a dot
    relative to ``kbase`` (``KP = C·GB``). Plane ``j`` of the bytes is dequantized in registers into the
    ``[BLOCK_N, KP]`` A operand of features ``kbase + kp0 + j·GB`` (plane order), or, ``CANON`` (canonical order),
    of every ``8/bits``-th feature from ``kbase + j``: the columns' ``C·G`` consecutive rows of xᵀ are then loaded
    once and split into the planes' rows in registers."""
    CPB: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // CPB
    QM: tl.constexpr = (1 << BITS) - 1
    act = xm.dtype.element_ty
    if CANON:
        s = sv
        z = zv
        kc = kbase + tl.arange(0, KP * CPB)  # the column set's consecutive features
        xc = tl.load(xm + kc[:, None], mask=(kc < K)[:, None] & m_ok[None, :], other=0.0)  # [KP·CPB, BLOCK_M]
        if CPB == 2:
            xa, xb = tl.split(tl.permute(tl.reshape(xc, [KP, 2, BLOCK_M]), [0, 2, 1]))  # features 2i, 2i + 1
        elif CPB == 4:
            x4 = tl.permute(tl.reshape(xc, [KP, 2, 2, BLOCK_M]), [0, 3, 1, 2])  # [i, m, j1, j0]: feature 4i + 2j1 + j0
            x01, x23 = tl.split(tl.permute(x4, [0, 1, 3, 2]))  # j1 = 0 / 1, each [i, m, j0]
            xa, xb = tl.split(x01)
            xc2, xd = tl.split(x23)
    else:
        s = (sv & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        if FLOAT_Z:
            z = (sv >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        else:
            z = ((sv >> 16) & 0xFF).to(tl.uint8)
    if ASM:  # 4 bits, fp16, integer zeros: 1024 + q of both planes by inline PTX
        h0, h1 = tl.inline_asm_elementwise(NIB2H, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
        zc = (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
    for j in tl.static_range(CPB):
        if ASM:  # (1024 + q) − (1024 + z) = q − z exactly, times s rounded once: the reference's value
            w3 = ((h0 if j == 0 else h1) - zc) * s
        else:
            q = (b >> (j * BITS)) & QM if CPB > 1 else b
            if DEQ16:  # fp16 activations, integer zeros: the same value as above, in plain Triton
                zc = (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                w3 = ((q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zc) * s
            else:
                w3 = ((q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(act)
        w = tl.reshape(w3.to(act), [BLOCK_N, KP])
        if CANON:
            kk = kbase + j + kp0  # [KP]
            k_ok = kk < K
            if CPB == 1:
                xt = xc
            elif CPB == 2:
                xt = xa if j == 0 else xb
            else:
                xt = xa if j == 0 else xb if j == 1 else xc2 if j == 2 else xd
        else:
            kk = kbase + j * GB + kp0  # [KP]
            k_ok = kk < K
            xt = tl.load(xm + kk[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)  # [KP, BLOCK_M]: xᵀ
        if not EVEN_K:  # the padded tail of the last group column is not part of the layer
            w = tl.where(k_ok[None, :], w, 0.0).to(act)
        if DOT_F32:  # the interpreter's bf16 tl.dot is wrong: same operands, float32 product there
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        else:
            acc = tl.dot(w, xt, acc)
    return acc


if HAS_TRITON:  # called from the kernel more than once: jitted once here for the compiled kernel; the
    # interpreter calls the plain functions, wrapped as constexprs (as gemv_layout does with its fp32 row redo)
    positions = triton.jit(_positions)
    POSITIONS_EMU = tl.constexpr(_positions)
    dot_cols = triton.jit(_dot_cols)
    DOT_COLS_EMU = tl.constexpr(_dot_cols)


def _gemm_kernel(
    x_ptr, qb_ptr, sz_ptr, z_ptr, meta_ptr, kts_ptr, rb_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, n_pad, n_kt, tiles_rt, split_k, stride_xm, stride_ym, n_tiles_n,
    G: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILES: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, FLOAT_Z: tl.constexpr, DEQ16: tl.constexpr, ASM: tl.constexpr, PF: tl.constexpr,
    HALVES: tl.constexpr, CANON: tl.constexpr, PDL: tl.constexpr,
):
    """One ``BLOCK_N × BLOCK_M`` tile of ``yᵀ`` over ``tiles_rt`` k-tiles (see the module docstring).

    Per k-tile: one metadata word per row; the position of each of the row's ``KTG`` group columns among
    its kept groups (a popcount of the mask bits below it: ``popc`` by inline PTX, ``ASM``, or SWAR); the
    ``[BLOCK_N, KTG, B]`` code bytes (``B = G·bits/8`` contiguous bytes per group, zeros for a pruned one)
    and one ``sz`` word per group. Plane ``j`` of the bytes (their ``j``-th ``bits``-wide field) is the
    ``[BLOCK_N, KTG·B]`` A operand of features ``g·G + j·B + i`` (layout version 2, plane order), dequantized
    in registers, against the matching ``[KTG·B, BLOCK_M]`` rows of xᵀ: ``8/bits`` dots per k-tile. ``HALVES``:
    the k-tile's columns in two sets of ``KTG/2``, each with its own loads, dequantization and dots. ``CANON``:
    the canonical view (layout version 3): ``qb_ptr`` / ``sz_ptr`` / ``z_ptr`` the layer's own codes, scales and
    zero points, positions counted from each row's first group ``rb_ptr[row]``.
    """
    KTG: tl.constexpr = BLOCK_K // G  # group columns per k-tile
    NH: tl.constexpr = 2 if HALVES else 1  # column sets per k-tile, each loaded, dequantized and dotted apart
    KH: tl.constexpr = KTG // NH  # group columns per set
    CPB: tl.constexpr = 8 // BITS  # codes per byte = planes
    GB: tl.constexpr = G // CPB  # bytes per group = features per plane and group
    KP: tl.constexpr = KH * GB  # features of one plane in a column set: the K of one dot
    INTERP: tl.constexpr = TILES > 0  # only the interpreter gets its trip count as a constexpr
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): x, y and the workspace after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None, None]  # [BLOCK_N, 1, 1]
    row_ok = rows < n_pad
    jw = tl.arange(0, KH)[None, :, None]  # group column inside the k-tile (first set)
    below = (1 << jw) - 1  # mask bits of the columns before it
    jw1 = jw + KH  # second set (HALVES)
    below1 = (1 << jw1) - 1
    eb = tl.arange(0, GB)[None, None, :]  # byte inside a group
    ar_p = tl.arange(0, KP)
    if CANON:  # plane 0 at every CPB-th feature (canonical order); each row's first group
        kp0 = ar_p * CPB
        rbase = tl.load(rb_ptr + rows, mask=row_ok, other=0)  # [BLOCK_N, 1, 1]
    else:  # feature of plane 0 at each k of a dot, relative to the column set: runs of GB consecutive features
        kp0 = tl.max_contiguous(tl.multiple_of((ar_p // GB) * G + ar_p % GB, GB), GB)
        rbase = 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    xm = x_ptr + offs_m[None, :] * stride_xm  # [1, BLOCK_M]
    acc = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    kt0 = pid_k * tiles_rt
    kt_end = tl.minimum(kt0 + tiles_rt, n_kt)
    # software pipeline by hand (a load is asynchronous until its registers are used): the row metadata two
    # k-tiles ahead and the kept groups' positions one ahead, so a k-tile's byte loads wait on no other load;
    # PF also prefetches the next k-tile's bytes into L2. (Carrying the loaded bytes one k-tile ahead as well
    # changed Triton's layouts: 7.1 instead of 4.5 instructions per weight.) Prologue: metadata of kt0 and
    # kt0 + 1, positions of kt0.
    meta = tl.load(meta_ptr + kt0 * n_pad + rows, mask=row_ok & (kt0 < kt_end), other=0)  # [BLOCK_N, 1, 1]
    kb = tl.load(kts_ptr + kt0, mask=kt0 < kt_end, other=0)
    if INTERP:
        gidx, present, gidx1, present1 = POSITIONS_EMU(meta, kb + rbase, jw, below, jw1, below1, ASM, HALVES)
    else:
        gidx, present, gidx1, present1 = positions(meta, kb + rbase, jw, below, jw1, below1, ASM, HALVES)
    meta = tl.load(meta_ptr + (kt0 + 1) * n_pad + rows, mask=row_ok & (kt0 + 1 < kt_end), other=0)
    kb = tl.load(kts_ptr + kt0 + 1, mask=kt0 + 1 < kt_end, other=0)
    # the interpreter cannot loop to a run-time bound: it gets the trip count as a constexpr (TILES > 0)
    for i in range(0, TILES if TILES > 0 else tiles_rt):
        kt = kt0 + i
        b = tl.load(qb_ptr + gidx * GB + eb, mask=present, other=0)  # uint8 [BLOCK_N, KH, GB]
        sv = tl.load(sz_ptr + gidx, mask=present, other=0)  # int32 [BLOCK_N, KH, 1]; pruned: s = z = 0
        zv = tl.load(z_ptr + gidx, mask=present, other=0) if CANON else sv  # (CANON: sv the fp16 scales)
        if HALVES:  # the second set's loads, before its positions move on to the next k-tile
            g1 = gidx1 * GB
            p1 = present1
        # positions of k-tile kt + 1 (its metadata is here), metadata of kt + 2
        if INTERP:
            gidx, present, gidx1, present1 = POSITIONS_EMU(meta, kb + rbase, jw, below, jw1, below1, ASM, HALVES)
        else:
            gidx, present, gidx1, present1 = positions(meta, kb + rbase, jw, below, jw1, below1, ASM, HALVES)
        if PF:  # and its code bytes into L2 (one prefetch per kept group)
            tl.inline_asm_elementwise(PREFL2, "=r,l,r", [qb_ptr + gidx * GB, present.to(tl.int32)], dtype=tl.int32,
                                      is_pure=False, pack=1)
            if HALVES:
                tl.inline_asm_elementwise(PREFL2, "=r,l,r", [qb_ptr + gidx1 * GB, present1.to(tl.int32)],
                                          dtype=tl.int32, is_pure=False, pack=1)
        meta = tl.load(meta_ptr + (kt + 2) * n_pad + rows, mask=row_ok & (kt + 2 < kt_end), other=0)
        kb = tl.load(kts_ptr + kt + 2, mask=kt + 2 < kt_end, other=0)

        # k-tile kt: each column set's planes dequantized and multiplied (the second set's bytes loaded here)
        for h in tl.static_range(NH):
            if h == 1:
                b = tl.load(qb_ptr + g1 + eb, mask=p1, other=0)
                sv = tl.load(sz_ptr + g1 // GB, mask=p1, other=0)
                zv = tl.load(z_ptr + g1 // GB, mask=p1, other=0) if CANON else sv
            if INTERP:
                acc = DOT_COLS_EMU(acc, b, sv, zv, xm, m_ok, kt * BLOCK_K + h * KH * G, K, kp0, G, BITS, BLOCK_N,
                                   BLOCK_M, KP, EVEN_K, DOT_F32, FLOAT_Z, DEQ16, ASM, CANON)
            else:
                acc = dot_cols(acc, b, sv, zv, xm, m_ok, kt * BLOCK_K + h * KH * G, K, kp0, G, BITS, BLOCK_N,
                               BLOCK_M, KP, EVEN_K, DOT_F32, FLOAT_Z, DEQ16, ASM, CANON)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    omask = n_ok[:, None] & m_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.full([BLOCK_N], 0.0, tl.float32)
    yp = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    if SPLIT:
        wsp = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        # relaxed atomics (no fence each): the barrier and the counter's acq_rel atomic order the sums
        # before the last program's read-back (as in gqsa.kernels.block_kernels)
        tl.atomic_add(wsp, acc, mask=omask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * n_tiles_n + pid_n
        old = tl.atomic_add(cnt_ptr + tile, 1)
        if old == split_k - 1:  # the last contributor writes the tile and leaves zeros behind
            zero = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
            tot = tl.where(omask, tl.atomic_add(wsp, zero, mask=omask, sem="relaxed"), 0.0)  # the sum, from L2 ...
            tl.store(wsp, zero, mask=omask)  # ... and leave zeros for the next launch
            tl.store(cnt_ptr + tile, 0)
            tl.store(yp, (tot + bias[:, None]).to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(yp, (acc + bias[:, None]).to(y_ptr.dtype.element_ty), mask=omask)


def sass_signature(canonical: bool = False):
    """(argument names, types, indices marked divisible by 16) of :func:`_gemm_kernel` for an offline compile
    (``benchmarks/gemm_sass.py``, tests): fp16 activations, integer zero points, as Triton's launcher specializes the
    pointers and the int arguments that are multiples of 16 in practice (M, N, K, n_pad, the strides)."""
    args = ["x_ptr", "qb_ptr", "sz_ptr", "z_ptr", "meta_ptr", "kts_ptr", "rb_ptr", "bias_ptr", "y_ptr", "ws_ptr",
            "cnt_ptr", "M", "N", "K", "n_pad", "n_kt", "tiles_rt", "split_k", "stride_xm", "stride_ym", "n_tiles_n"]
    sz_z = ["*fp16", "*u8"] if canonical else ["*i32", "*i32"]
    types = ["*fp16", "*u8"] + sz_z + ["*i32", "*i32", "*i32", "*fp16", "*fp16", "*fp32", "*i32"] + ["i32"] * 10
    return args, types, set(range(11)) | {11, 12, 13, 14, 18, 19}


def _kernel():
    return jitted(_gemm_kernel)


@dataclass(frozen=True)
class GemmConfig:
    """Tuning knobs of one launch. ``split_k`` 0 = choose from the grid size (:func:`auto_split`)."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    waves: float = 2.0  # split_k=0: aim for this many programs per SM
    deq16: bool = True  # fp16 activations with integer zeros: dequantize in fp16 (same result, fewer ops)
    asm: bool = True  # compiled, 4 bits, fp16, integer zeros: inline PTX dequantization and popcount (same result)
    prefetch: bool = False  # compiled: an L2 prefetch of the next k-tile's code bytes
    maxnreg: int = 0  # compiled: ptxas's register limit per thread (0: none), for more programs per SM
    halves: bool = False  # each k-tile as two sets of group columns loaded, dequantized and multiplied apart
    # (half the live registers of a tile; layouts with at least two group columns per k-tile)

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two ≥ 16, got {v}")
        if self.block_n % ROW_BLOCK:
            raise ValueError(f"block_n must be a multiple of {ROW_BLOCK}")
        if self.split_k < 0:
            raise ValueError(f"split_k must be ≥ 0, got {self.split_k}")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def auto_split(m: int, layout: TileLayout, cfg: GemmConfig, sms: int) -> int:
    """Split-K factor: enough programs for ``cfg.waves`` per SM, each keeping ≥ 2 k-tiles."""
    if cfg.split_k:
        return max(1, min(cfg.split_k, layout.n_ktiles))
    tiles = math.ceil(m / cfg.block_m) * math.ceil(layout.shape[0] / cfg.block_n)
    want = math.ceil(cfg.waves * sms / tiles)
    return max(1, min(want, layout.n_ktiles // 2 or 1))


class Workspace:
    """Self-cleaning split-K buffers shared by the layers of one device (they run one after another
    on one stream): float32 partial sums and int32 per-tile counters, zero between launches. Grown
    only outside CUDA-graph capture (warm up before capturing)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.partial = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.counters = torch.zeros(0, dtype=torch.int32, device=self.device)

    def get(self, n_partial: int, n_counters: int):
        if self.partial.numel() < n_partial or self.counters.numel() < n_counters:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the GQSA split-K workspace must grow, which cannot happen during CUDA-graph "
                                   "capture: run the same batch size once before capturing")
            self.partial = torch.zeros(max(n_partial, self.partial.numel()), dtype=torch.float32, device=self.device)
            self.counters = torch.zeros(max(n_counters, self.counters.numel()), dtype=torch.int32,
                                        device=self.device)
        return self.partial, self.counters


_WORKSPACES: dict = {}


def workspace(device) -> Workspace:
    device = torch.device(device)
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _WORKSPACES[device] = Workspace(device)
    return ws


def check_io(x2: torch.Tensor, shape: tuple[int, int], y: torch.Tensor, bias: torch.Tensor | None, who: str) -> None:
    """One clear ``ValueError`` for arguments a launcher of a layer of ``shape`` ``(N, K)`` cannot take:
    ``x2`` [M, K] fp16/bf16, ``y`` [M, N] in its dtype, both with unit stride along the last dimension,
    ``bias`` None or a contiguous [N] tensor in its dtype."""
    m, k = x2.shape
    n = shape[0]
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{who} reads float16 or bfloat16 activations, got {x2.dtype}")
    if k != shape[1]:
        raise ValueError(f"x has {k} features, the layer {shape[1]}")
    if x2.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y must have unit stride along their last dimension")
    if tuple(y.shape) != (m, n) or y.dtype != x2.dtype:
        raise ValueError(f"y must be [{m}, {n}] {x2.dtype}, got {list(y.shape)} {y.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x2.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] {x2.dtype} tensor")


class GemmCall:
    """The tensor-core kernel's launch for one layout, configuration and call shape (``m`` rows of x in
    ``dtype``, row strides ``stride_x`` / ``stride_y``, with or without a bias), everything that depends
    only on those computed once; ``call(x2, bias, y)`` launches it (:func:`launch_gemm` checks the
    arguments; a prepared call trusts them), after the first time through the compiled kernel directly
    while x2, y and the bias stay 16-byte aligned (as :class:`gqsa.kernels.block_gemm.BlockCall`)."""

    def __init__(self, layout: TileLayout, cfg: GemmConfig, m: int, dtype: torch.dtype, has_bias: bool,
                 stride_x: int, stride_y: int, sms: int):
        n, k = layout.shape
        self.m = m
        interp = _interpret()
        split = auto_split(m, layout, cfg, sms)
        tiles_per_split = math.ceil(layout.n_ktiles / split)
        split = math.ceil(layout.n_ktiles / tiles_per_split)  # no program without k-tiles
        tm, tn = math.ceil(m / cfg.block_m), math.ceil(n / cfg.block_n)
        self.ws_size = (m * n, tm * tn) if split > 1 else None
        deq16 = cfg.deq16 and dtype == torch.float16 and not layout.float_zeros
        self.consts = dict(G=layout.group_size, BITS=layout.bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=layout.block_k, TILES=tiles_per_split if interp else 0, SPLIT=split > 1,
                           HAS_BIAS=has_bias, EVEN_K=k % layout.group_size == 0,
                           DOT_F32=interp and dtype == torch.bfloat16, FLOAT_Z=layout.float_zeros, DEQ16=deq16,
                           ASM=cfg.asm and deq16 and layout.bits == 4 and not interp, PF=cfg.prefetch and not interp,
                           HALVES=cfg.halves and layout.block_k // layout.group_size >= 2, CANON=layout.canonical)
        q = layout.qweight
        dev = q.device

        def some(t, dtype):  # a kernel argument never empty (a layer without kept groups)
            return t if t.numel() else torch.zeros(1, dtype=dtype, device=dev)

        if layout.canonical:
            sz, z = some(layout.scales_c, torch.float16), some(layout.zeros_c, layout.zeros_c.dtype)
            rb = layout.row_base
        else:
            sz = z = rb = some(layout.sz, torch.int32)
        self.weights = (some(q, torch.uint8), sz, z, layout.meta, layout.kt_start, rb)
        self.ints = (m, n, k, layout.n_pad, layout.n_ktiles, tiles_per_split, split, stride_x, stride_y, tn)
        self.grid = (tm, tn, split)
        self.launch = (cfg.num_warps, cfg.num_stages)
        self.options = {"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interp else {}
        self.kern, self._bound = _kernel(), None

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if self.ws_size is not None:
            ws, cnt = workspace(y.device).get(*self.ws_size)
        else:
            ws = cnt = y  # unused
        args = (x2, *self.weights, bias if bias is not None else y, y, ws, cnt, *self.ints)
        self._bound = rebind(self._bound, aligned16(x2, y, bias), self.kern, self.grid, args, self.consts, y.device,
                             *self.launch, pdl="gemm", rows=self.m, **self.options)
        return y


def launch_gemm(x2: torch.Tensor, layout: TileLayout, bias: torch.Tensor | None, y: torch.Tensor,
                cfg: GemmConfig, sms: int | None = None) -> torch.Tensor:
    """``y[M, N] = x2[M, K] @ Ŵᵀ (+ bias)``; ``x2`` fp16/bf16 with unit stride along K, ``y`` [M, N]
    contiguous in ``x2``'s dtype (written in full), ``bias`` [N] contiguous in ``x2``'s dtype or None."""
    check_io(x2, layout.shape, y, bias, "the tensor-core kernel")
    m = x2.shape[0]
    if m == 0:
        return y
    call = GemmCall(layout, cfg, m, x2.dtype, bias is not None, x2.stride(0), y.stride(0), sms or num_sms(x2.device))
    return call(x2, bias, y)
