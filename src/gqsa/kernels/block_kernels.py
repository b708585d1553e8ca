"""Triton kernel over the block-uniform :class:`~gqsa.kernels.block_layout.BlockLayout` (launcher:
:mod:`gqsa.kernels.block_gemm`).

``y[M, N] = x[M, K] @ Ŵᵀ (+ bias)``, computed transposed: program ``(pid_m, b, pid_k)`` accumulates the
``R × BLOCK_M`` tile ``Ŵ_b · x_tileᵀ`` of row block ``b`` (the weights are the tensor-core A operand, so
R output rows fill its M dimension and a handful of tokens its N dimension) over its ``pid_k``-th range
of ``sps`` steps. A step is ``NP`` byte tiles (``NP · 8/bits`` kept groups). Per kept group (slot) it

* takes the slot's ``[R, G]`` codes out of the byte tile (one shift, one mask; the byte tile is one
  contiguous run, loaded once for its ``8/bits`` slots),
* gathers the activations of the slot's group column, ``x[m, col·G + t]`` as a ``[G, BLOCK_M]`` tile
  (contiguous runs of G elements), shared by the R rows of the block,
* and, ``SCALE_AFTER`` (small M): ``acc += s ⊙ tl.dot(q − z, x_g)`` — the integer codes minus the zero
  point are exact in fp16/bf16, so the product is float32-accurate and the scale is one FMA per
  output element per group instead of one multiply per weight (this is *not* the reference's
  rounding of each weight to the activation dtype: the tests hold it to the GEMV tolerances);
  float zero points: ``acc += s ⊙ (tl.dot(q, x_g) − z ⊗ Σ_t x_g)``;
* else (large M): ``acc = tl.dot(s·(q − z), x_g, acc)`` with the weight rounded to the activation
  dtype exactly as :func:`gqsa.kernels.reference.dequantize` does (fp16 with integer zeros:
  ``(1024 + q) − (1024 + z)`` exact, times s rounded once; otherwise in float32).

``WIDE`` (``BlockConfig.wide``): a step is one dot of K = ``NP · G`` per code position instead of one of
K = G per kept group — the step's ``NP`` byte tiles are loaded as ``[R, NP, G]``, dequantized with every
weight scaled first (the reference's rounding, as above), and reshaped into the ``[R, NP·G]`` A operand;
the activations of the step's kept groups come as one ``[NP·G, BLOCK_M]`` tile whose column index is
loaded per k (runs of G equal values, declared with ``tl.max_constancy``/``tl.max_contiguous`` so that
the gather is G contiguous features per run and the asynchronous copy lands in the dot's shared-memory
operand without a detour through registers). Fewer, larger tensor-core steps; measured faster for block128
at every M and block64 up to M = 64 (benchmarks/RESULTS.md).

Only kept groups are touched: the work is proportional to the kept weights. Split-K
(``split_k > 1``): partial tiles go to a float32 workspace with atomics, the last program of a tile
(an atomic counter) reads the sum, zeroes the workspace and the counter, adds the bias and writes y —
one launch, CUDA-graph capturable (the scheme of :mod:`gqsa.kernels.gemm`). ``ROW_MAP``: the tile's
output rows come from the layout's ``row_map`` (blocks of non-consecutive rows, ``--allocation clusterR``;
split-K partial sums stay in block-row order, so that their atomics are coalesced, and go through the map
only at the final store — or, ``BLOCK_OUT``, not at all: y is written in block-row order, with vector
stores, into a ``[M, n_blocks·R]`` buffer that the launcher permutes into place). ``PRE``: the kept weights were dequantized by :func:`block_dequant_kernel` into a
scratch ``[n_blocks·R, slots·G]`` in the activation dtype; a step is ``NP`` slots, one dot of K = ``NP·G``,
both operands copied asynchronously into shared memory and nothing computed in between (large M). ``TMA``
(with ``PRE``): the scratch comes as a tensor descriptor and each step's ``[R, NP·G]`` weight tile is one
bulk copy by the Hopper tensor-memory accelerator instead of ``R·NP·G`` element addresses (the activations
stay a gather of G-runs): fewer registers and address instructions per step; 3-12 % faster block128 layer
calls at M = 512-2048 than the element loads in the same configuration (benchmarks/RESULTS.md, "Session 18").

(Under ``TRITON_INTERPRET=1``: the loop gets its trip count as a constexpr (``STEPS``), sums are
``tl.reduce`` (a jitted ``tl.sum`` made before the interpreter was switched on cannot run), and bf16 dots
are done on float32 operands (``DOT_F32``), the interpreter's bf16 ``tl.dot`` being wrong.)
"""
from __future__ import annotations

from .gemv import HAS_TRITON

if HAS_TRITON:
    import triton.language as tl
else:  # pragma: no cover
    tl = None


# Inline PTX for 4-bit codes with fp16 activations (compiled mode only, ``ASM``): 4 bytes of a byte tile
# (4 features; slot 0 in the low nibbles, slot 1 in the high ones) in one register → 1024 + q as fp16
# for both slots. prmt spreads bytes 0, 1 (2, 3) into the two half-words; OR-ing a low nibble into the
# mantissa of 1024.0 (0x6400) gives 1024 + q exactly; a high nibble gives 1024 + 16·q, and
# fma(v, 1/16, 960) = 1024 + q exactly. 2 prmt + 4 lop3 + 2 fma per 8 codes.
_NIB2H = """{
.reg .b32 t0, t1, h0, h1, k16, k960;
mov.b32 k16, 0x2C002C00;
mov.b32 k960, 0x63806380;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xea;
lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xea;
lop3.b32 h0, t0, 0x00F000F0, 0x64006400, 0xea;
lop3.b32 h1, t1, 0x00F000F0, 0x64006400, 0xea;
fma.rn.f16x2 $2, h0, k16, k960;
fma.rn.f16x2 $3, h1, k16, k960;
}"""
NIB2H = tl.constexpr(_NIB2H) if HAS_TRITON else _NIB2H


def block_kernel(
    x_ptr, qb_ptr, sz_ptr, col_ptr, bp_ptr, rmap_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, wd_ptr,
    M, N, K, sps, split_k, stride_xm, stride_ym, n_blocks, stride_wd, spb,
    R: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, NP: tl.constexpr,
    STEPS: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_AFTER: tl.constexpr,
    DOT_F32: tl.constexpr, FLOAT_Z: tl.constexpr, FP16: tl.constexpr, ASM: tl.constexpr, COL_VEC: tl.constexpr,
    ROW_MAP: tl.constexpr, WIDE: tl.constexpr, PRE: tl.constexpr, BLOCK_OUT: tl.constexpr, PDL: tl.constexpr,
    UNI: tl.constexpr = False, TMA: tl.constexpr = False,
):
    CPB: tl.constexpr = 8 // BITS  # slots per byte tile
    QM: tl.constexpr = (1 << BITS) - 1
    act = x_ptr.dtype.element_ty
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): x, y, wd and the workspace after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    pid_k = tl.program_id(2)
    if UNI:  # every block has `spb` slots (BlockLayout.uniform_slots): no block-pointer load ahead of the weights'
        s_lo = blk * spb
        s_hi = s_lo + spb
    else:
        s_lo = tl.load(bp_ptr + blk)
        s_hi = tl.load(bp_ptr + blk + 1)
    u_lo = s_lo // CPB
    u_hi = s_hi // CPB
    ar_r = tl.arange(0, R)
    ar_t = tl.arange(0, G)
    tile_off = ar_r[:, None] * G + ar_t[None, :]  # [R, G] inside a byte tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    x_off = ar_t[:, None] + offs_m[None, :] * stride_xm  # [G, BLOCK_M]: x_gᵀ
    acc = tl.full([R, BLOCK_M], 0.0, tl.float32)
    u_start = u_lo + pid_k * sps * NP
    if PRE:  # the kept weights were dequantized by block_dequant_kernel: a step is NP slots, one dot of K = NP·G
        ar_j = tl.arange(0, NP * G)
        if not TMA:
            a_row = wd_ptr + (blk * R + ar_r)[:, None].to(tl.int64) * stride_wd  # [R, 1]
        xm_off = offs_m[None, :] * stride_xm
        for i in range(0, STEPS if STEPS > 0 else sps):
            j0 = (pid_k * sps + i) * NP  # the step's first slot of the block
            s_j = s_lo + j0 + ar_j // G  # [NP·G]: the slot of each k
            ok_j = s_j < s_hi
            if TMA:  # wd_ptr is a tensor descriptor of the scratch: one asynchronous bulk copy of [R, NP·G]
                a = wd_ptr.load([blk * R, j0 * G])  # (columns past the block's slots are zeros: ZERO in the pass)
            else:
                a = tl.load(a_row + (j0 * G + ar_j)[None, :], mask=ok_j[None, :], other=0.0)  # [R, NP·G]
            col_j = tl.max_constancy(tl.load(col_ptr + s_j, mask=ok_j, other=-1), G)
            feat = tl.max_contiguous(tl.multiple_of(col_j * G + ar_j % G, G), G)
            xk = tl.load(x_ptr + feat[:, None] + xm_off, mask=((col_j >= 0) & (feat < K))[:, None] & m_ok[None, :],
                         other=0.0)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), xk.to(tl.float32), acc)
            else:
                acc = tl.dot(a, xk, acc)
    elif WIDE:  # one dot of K = NP·G per step and code position (see the module docstring)
        ar_p = tl.arange(0, NP)
        w_off = ar_r[:, None, None] * G + ar_p[None, :, None] * (R * G) + ar_t[None, None, :]  # [R, NP, G]
        ar_j = tl.arange(0, NP * G)  # k of the step's dot: kept group j // G, feature j % G
        xm_off = offs_m[None, :] * stride_xm
        for i in range(0, STEPS if STEPS > 0 else sps):
            u0 = u_start + i * NP
            u_p = u0 + ar_p  # [NP] byte tiles of this step
            ok_p = u_p < u_hi
            b = tl.load(qb_ptr + u0 * (R * G) + w_off, mask=ok_p[None, :, None], other=0)  # uint8 [R, NP, G]
            if ASM:
                h0, h1 = tl.inline_asm_elementwise(NIB2H, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                                   is_pure=True, pack=4)
            for c in tl.static_range(CPB):
                slot_p = u_p * CPB + c  # [NP]
                szw = tl.load(sz_ptr + slot_p[None, :] * R + ar_r[:, None], mask=ok_p[None, :], other=0)  # [R, NP]
                s = (szw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)[:, :, None]
                if FLOAT_Z:
                    z = (szw >> 16).to(tl.int16).to(tl.float16, bitcast=True)[:, :, None]
                else:
                    z = (szw >> 16).to(tl.uint8)[:, :, None]
                # the activations as one [NP·G, BLOCK_M] tile (the dot's B operand, copied straight into
                # shared memory): the column of each k, loaded G times (runs of G equal values, as the
                # hint says), so the gather is G contiguous features per run — 16-byte copies
                u_j = u0 + ar_j // G
                col_j = tl.max_constancy(tl.load(col_ptr + u_j * CPB + c, mask=u_j < u_hi, other=-1), G)
                feat = tl.max_contiguous(tl.multiple_of(col_j * G + ar_j % G, G), G)  # [NP·G]
                xk = tl.load(x_ptr + feat[:, None] + xm_off, mask=((col_j >= 0) & (feat < K))[:, None] & m_ok[None, :],
                             other=0.0)
                if ASM:
                    zc = (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                    w3 = ((h0 if c == 0 else h1) - zc) * s
                else:
                    q = (b >> (c * BITS)) & QM if CPB > 1 else b
                    if FP16 and not FLOAT_Z:  # the reference's value: (q − z) exact, times s rounded once
                        zc = (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                        w3 = ((q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zc) * s
                    else:
                        w3 = ((q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(act)
                w = tl.reshape(w3, (R, NP * G))
                if DOT_F32:
                    acc = tl.dot(w.to(tl.float32), xk.to(tl.float32), acc)
                else:
                    acc = tl.dot(w, xk, acc)
    else:  # one dot of K = G per kept group
        for i in range(0, STEPS if STEPS > 0 else sps):
            for p in tl.static_range(NP):
                u = u_start + i * NP + p
                ok = u < u_hi
                b = tl.load(qb_ptr + u * (R * G) + tile_off, mask=ok, other=0)  # uint8 [R, G]
                if ASM:  # 4 bits, fp16: 1024 + q of both slots by inline PTX
                    h0, h1 = tl.inline_asm_elementwise(NIB2H, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                                       is_pure=True, pack=4)
                for c in tl.static_range(CPB):
                    slot = u * CPB + c
                    # COL_VEC: the column as a [G, 1] tensor (one address), a load the software pipeliner can
                    # issue stages ahead of the gather that depends on it (a scalar load it cannot). Fewer
                    # stalls in theory, but 5–60 % slower on the H200 (benchmarks/RESULTS.md): off by default.
                    if COL_VEC:
                        col = tl.load(col_ptr + slot + ar_t[:, None] * 0, mask=ok, other=-1)
                    else:
                        col = tl.load(col_ptr + slot, mask=ok, other=-1)
                    szw = tl.load(sz_ptr + slot * R + ar_r, mask=ok, other=0)  # [R] int32: scale | zero << 16
                    s = (szw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
                    if FLOAT_Z:
                        z = (szw >> 16).to(tl.int16).to(tl.float16, bitcast=True)
                    else:
                        z = (szw >> 16).to(tl.uint8)
                    feat = col * G + ar_t[:, None]  # [G, 1]
                    xg = tl.load(x_ptr + col * G + x_off, mask=(col >= 0) & (feat < K) & m_ok[None, :],
                                 other=0.0)  # [G, BLOCK_M]
                    if ASM:  # q − z exactly, in fp16
                        zc = (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                        d = (h0 if c == 0 else h1) - zc[:, None]
                    elif CPB > 1:
                        q = (b >> (c * BITS)) & QM
                    else:
                        q = b
                    if SCALE_AFTER:
                        if ASM:
                            pass  # d is q − z already
                        elif DOT_F32:  # interpreter, bf16: its integer → bf16 casts are wrong; same values in fp32
                            d = q.to(tl.float32)
                            if not FLOAT_Z:
                                d -= z.to(tl.float32)[:, None]
                        elif FLOAT_Z:
                            d = q.to(act)  # exact
                        elif FP16:  # (1024 + q) − (1024 + z): q − z exactly
                            zc = (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                            d = (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zc[:, None]
                        else:
                            d = (q.to(tl.int16) - z.to(tl.int16)[:, None]).to(act)  # |q − z| ≤ 255: exact in bf16
                        if DOT_F32:
                            part = tl.dot(d, xg.to(tl.float32))
                        else:
                            part = tl.dot(d, xg)
                        if FLOAT_Z:
                            xsum = tl.reduce(xg.to(tl.float32), 0, tl.standard._sum_combine)  # [BLOCK_M]
                            part -= z.to(tl.float32)[:, None] * xsum[None, :]
                        acc += part * s.to(tl.float32)[:, None]
                    else:
                        if ASM:
                            w = d * s[:, None]
                        elif FP16 and not FLOAT_Z:  # the reference's value: (q − z) exact, times s rounded once
                            zc = (z.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                            w = ((q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zc[:, None]) * s[:, None]
                        else:
                            w = ((q.to(tl.float32) - z.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]).to(act)
                        if DOT_F32:
                            acc = tl.dot(w.to(tl.float32), xg.to(tl.float32), acc)
                        else:
                            acc = tl.dot(w, xg, acc)

    if ROW_MAP:  # blocks of non-consecutive rows (clusterR): the output row of each block row, −1 padding
        map_n = tl.load(rmap_ptr + blk * R + ar_r)
        map_ok = map_n >= 0
    if ROW_MAP and not BLOCK_OUT:  # y through the map: one 2-byte store per element
        offs_n = map_n
        n_ok = map_ok
    elif ROW_MAP:  # y in block-row order ([M, n_blocks·R], every block row): vector stores, permuted after
        offs_n = blk * R + ar_r
        n_ok = ar_r < R
    else:
        offs_n = blk * R + ar_r
        n_ok = offs_n < N
    omask = n_ok[:, None] & m_ok[None, :]
    if HAS_BIAS:
        if ROW_MAP:
            bias = tl.load(bias_ptr + map_n, mask=map_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.full([R], 0.0, tl.float32)
    yp = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    if SPLIT:
        # relaxed atomics for the partial sums and their read-back (no fence each): the barrier and the
        # counter's acq_rel atomic order every program's sums before the last program's reads, as a split-K
        # semaphore does (17 fences per thread → 1, and 65 → 1 with the row map, in the sm_90 build)
        if ROW_MAP:  # in block-row order, every block row (padding rows add zeros): coalesced, vectorized
            wsp = ws_ptr + offs_m[None, :] * (n_blocks * R) + (blk * R + ar_r)[:, None]
            wmask = (ar_r < R)[:, None] & m_ok[None, :]
        else:
            wsp = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
            wmask = omask
        tl.atomic_add(wsp, acc, mask=wmask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * n_blocks + blk
        old = tl.atomic_add(cnt_ptr + tile, 1)
        if old == split_k - 1:  # the last contributor writes the tile and leaves zeros behind
            zero = tl.full([R, BLOCK_M], 0.0, tl.float32)
            tot = tl.atomic_add(wsp, zero, mask=wmask, sem="relaxed")
            if STEPS > 0:  # interpreter: its masked atomics return whatever memory holds (never stored, but cast)
                tot = tl.where(wmask, tot, 0.0)
            tl.store(wsp, zero, mask=wmask)
            tl.store(cnt_ptr + tile, 0)
            tl.store(yp, (tot + bias[:, None]).to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(yp, (acc + bias[:, None]).to(y_ptr.dtype.element_ty), mask=omask)


def block_dequant_kernel(
    qb_ptr, sz_ptr, bp_ptr, wd_ptr, stride_wd, TPP,
    R: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, FLOAT_Z: tl.constexpr, FP16: tl.constexpr,
    STEPS: tl.constexpr, PDL: tl.constexpr, ZERO: tl.constexpr = False,
):
    """The ``pre`` path's first pass: the kept weights of block ``program_id(0)`` in the activation
    dtype, ``wd[b·R + r, j·G + t]`` = weight ``(r, t)`` of the block's ``j``-th slot (the reference's
    rounding, as the wide step does it); program ``program_id(1)`` takes ``TPP`` byte tiles. ``ZERO``: the
    columns past the block's slots, up to ``stride_wd``, are written as zeros (byte tiles past the block's
    end load as code 0, scale 0) — for the TMA step, whose copies take whole ``NP·G`` columns."""
    CPB: tl.constexpr = 8 // BITS
    QM: tl.constexpr = (1 << BITS) - 1
    act = wd_ptr.dtype.element_ty
    if PDL:  # (gqsa.kernels.jit) wd is scratch memory an earlier kernel may still read
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    blk = tl.program_id(0)
    u_lo = tl.load(bp_ptr + blk) // CPB
    u_hi = tl.load(bp_ptr + blk + 1) // CPB
    ar_r = tl.arange(0, R)
    ar_t = tl.arange(0, G)
    row = wd_ptr + (blk * R + ar_r)[:, None].to(tl.int64) * stride_wd
    for i in range(0, STEPS if STEPS > 0 else TPP):
        ul = tl.program_id(1) * TPP + i  # byte tile of the block
        u = u_lo + ul
        ok = u < u_hi
        b = tl.load(qb_ptr + u * (R * G) + ar_r[:, None] * G + ar_t[None, :], mask=ok, other=0)  # uint8 [R, G]
        for c in tl.static_range(CPB):
            szw = tl.load(sz_ptr + (u * CPB + c) * R + ar_r, mask=ok, other=0)
            s = (szw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)[:, None]
            q = (b >> (c * BITS)) & QM if CPB > 1 else b
            if FLOAT_Z:
                z = (szw >> 16).to(tl.int16).to(tl.float16, bitcast=True)[:, None]
                w = ((q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(act)
            elif FP16:  # (q − z) exact, times s rounded once
                zc = ((szw >> 16).to(tl.uint8).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)[:, None]
                w = ((q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zc) * s
            else:
                z = (szw >> 16).to(tl.uint8)[:, None]
                w = ((q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)).to(act)
            cols = (ul * CPB + c) * G + ar_t
            if ZERO:
                tl.store(row + cols[None, :], w, mask=(cols < stride_wd)[None, :])
            else:
                tl.store(row + cols[None, :], w, mask=ok)
