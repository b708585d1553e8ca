"""Fused GQSA kernels (Triton) over the packed BSR layout of :mod:`gqsa.format`.

``y[B, N] = x[B, K] @ Ŵᵀ (+ bias)`` with ``Ŵ = s · (q − z)`` read straight from
``row_ptr / col_idx / qweight / scales / zeros``: every kept group is read once, pruned groups are
never touched, dequantization happens in registers in float32 and the products are accumulated in
float32.

Paths (one entry point, :func:`gqsa_linear`, picks by batch size):

* ``variant="task"`` (default for B ≤ 16) — **task-centric** decode GEMV. The kept groups
  ``0 … nnz−1`` are cut into equal tasks of ``task_size`` groups, independent of row boundaries;
  one program per task, the grid sized to the GPU (:func:`build_task_table`, built once per layer
  and cacheable). A row lying entirely inside one task is reduced and stored directly; a row cut
  by task boundaries ("split row", at most two per task) is merged through an fp32 workspace with
  atomics, and the last task to arrive at that row (an atomic counter) writes it, adds the bias and
  resets the workspace for the next launch — one launch, no memset, safe to capture in a CUDA graph.
* ``variant="data"`` — the plain data-centric kernel, one program per output row.
* ``variant="dense"`` (default for B > 16, prefill) — a Triton kernel expands the layer to a dense
  ``[N, K]`` weight in the activation dtype (bit-identical to ``reference.dequantize``), then cuBLAS
  through ``F.linear``.
* ``variant="reference"`` — :func:`gqsa.kernels.reference.linear`, the pure-torch ground truth; also
  what runs on the CPU unless ``TRITON_INTERPRET=1`` is set (then the Triton kernels run in the
  interpreter, which is how CI tests them).

Kernels support bits ∈ {2, 4, 8}, G ∈ {16, 32, 64, 128}, integer (uint8) and float16 zero points,
K not divisible by G (the padded tail of the last group column is masked: x is never read out of
bounds), activations in float16 / bfloat16 / float32. 3-bit layers (codes straddle bytes) use the
reference path.

The interpreter/compiled choice is made when a kernel is first launched (not at import), per mode,
so importing this module before or after ``TRITON_INTERPRET`` is set does not matter.
"""
from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..format import PackedLinear
from . import reference

try:  # triton is optional: without it every path falls back to the reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

MAX_DECODE_BATCH = 16
KERNEL_BITS = (2, 4, 8)
VARIANTS = ("auto", "task", "data", "dense", "reference")
_WS_STRIDE = MAX_DECODE_BATCH  # fp32 workspace entries per split-row slot


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# ============================================================================ kernels (plain python;
# jitted lazily by _kernel() so that the interpreter/compiled choice follows TRITON_INTERPRET at the
# time of the launch). They reference no other jit function, so each compiles on its own.


def _task_kernel(
    x_ptr, qw_ptr, col_ptr, s_ptr, z_ptr, rp_ptr, tab_ptr, need_ptr, ws_ptr, cnt_ptr, bias_ptr, y_ptr,
    N, K, nnz, task_size, stride_xb, stride_yb, B,
    G: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, WS_STRIDE: tl.constexpr,
):
    QB: tl.constexpr = G * BITS // 8  # bytes of codes per group
    t = tl.program_id(0)
    t0 = t * task_size
    t1 = tl.minimum(t0 + task_size, nnz)
    r = tl.load(tab_ptr + t * 4)  # first row this task visits
    r_hi = tl.load(tab_ptr + t * 4 + 1)  # one past the last
    slot_first = tl.load(tab_ptr + t * 4 + 2)  # workspace slot of the first row if it is split
    slot_last = tl.load(tab_ptr + t * 4 + 3)  # ... of the last row if it is split
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_e = tl.arange(0, G)
    offs_q = tl.arange(0, QB)
    ar = tl.arange(0, BLOCK_G)
    rs = tl.load(rp_ptr + r)
    re = tl.load(rp_ptr + r + 1)
    acc = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)

    # prefetch the first chunk; each iteration issues the next chunk's loads before computing
    g_n = t0 + ar
    m_n = g_n < t1
    qb_n = tl.load(qw_ptr + g_n[:, None] * QB + offs_q[None, :], mask=m_n[:, None], other=0)
    col_n = tl.load(col_ptr + g_n, mask=m_n, other=0)
    s_n = tl.load(s_ptr + g_n, mask=m_n, other=0.0)
    z_n = tl.load(z_ptr + g_n, mask=m_n, other=0)
    c = t0
    while c < t1:  # (a while, not range(): the interpreter cannot index with run-time bounds)
        offs_g = c + ar
        mg = offs_g < t1
        qb = qb_n
        col = col_n.to(tl.int32)
        s = s_n.to(tl.float32)
        z = z_n.to(tl.float32)
        g_n = offs_g + BLOCK_G
        m_n = g_n < t1
        qb_n = tl.load(qw_ptr + g_n[:, None] * QB + offs_q[None, :], mask=m_n[:, None], other=0)
        col_n = tl.load(col_ptr + g_n, mask=m_n, other=0)
        s_n = tl.load(s_ptr + g_n, mask=m_n, other=0.0)
        z_n = tl.load(z_ptr + g_n, mask=m_n, other=0)

        # ---- unpack codes [BLOCK_G, G] (little-endian bit stream) and dequantize (without s)
        if BITS == 4:
            codes = tl.interleave(qb & 0xF, qb >> 4)
        elif BITS == 2:
            codes = tl.interleave(tl.interleave(qb & 3, (qb >> 4) & 3), tl.interleave((qb >> 2) & 3, qb >> 6))
        else:
            codes = qb
        w = codes.to(tl.float32) - z[:, None]
        kk = col[:, None] * G + offs_e[None, :]
        xm = mask_b[:, None, None] & mg[None, :, None]
        if not EVEN_K:
            xm = xm & (kk < K)[None, :, :]
        xv = tl.load(x_ptr + offs_b[:, None, None] * stride_xb + kk[None, :, :], mask=xm, other=0.0)
        p = tl.sum(xv.to(tl.float32) * w[None, :, :], axis=2) * s[None, :]  # [BLOCK_B, BLOCK_G]

        # ---- rows ending inside this chunk: reduce and emit
        c_end = tl.minimum(c + BLOCK_G, t1)
        while (re <= c_end) & (r < r_hi):
            seg = (offs_g < re)[None, :]
            acc += tl.where(seg, p, 0.0)
            p = tl.where(seg, 0.0, p)
            v = tl.sum(acc, axis=1)
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
                    tot = tl.atomic_add(ws_ptr + slot * WS_STRIDE + offs_b, tl.zeros_like(v), mask=mask_b)  # L2 read
                    tl.store(ws_ptr + slot * WS_STRIDE + offs_b, tl.zeros_like(v), mask=mask_b)  # reset
                    tl.store(cnt_ptr + slot, 0)
                    tl.store(y_ptr + offs_b * stride_yb + r, (tot + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
            else:
                tl.store(y_ptr + offs_b * stride_yb + r, (v + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
            acc = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
            r += 1
            rs = re
            re = tl.load(rp_ptr + r + 1, mask=r < N, other=0)
        acc += p
        c += BLOCK_G

    # rows not finished inside the loop: the last row if it continues in the next task, and (last
    # task / empty layer) trailing empty rows
    while r < r_hi:
        v = tl.sum(acc, axis=1)
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
                tot = tl.atomic_add(ws_ptr + slot * WS_STRIDE + offs_b, tl.zeros_like(v), mask=mask_b)
                tl.store(ws_ptr + slot * WS_STRIDE + offs_b, tl.zeros_like(v), mask=mask_b)
                tl.store(cnt_ptr + slot, 0)
                tl.store(y_ptr + offs_b * stride_yb + r, (tot + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
        else:
            tl.store(y_ptr + offs_b * stride_yb + r, (v + bv).to(y_ptr.dtype.element_ty), mask=mask_b)
        acc = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
        r += 1
        rs = re
        re = tl.load(rp_ptr + r + 1, mask=r < N, other=0)


def _row_kernel(
    x_ptr, qw_ptr, col_ptr, s_ptr, z_ptr, rp_ptr, bias_ptr, y_ptr,
    K, stride_xb, stride_yb, B,
    G: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Data-centric: program ``r`` computes output row ``r`` over its kept groups."""
    QB: tl.constexpr = G * BITS // 8
    r = tl.program_id(0)
    rs = tl.load(rp_ptr + r)
    re = tl.load(rp_ptr + r + 1)
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_e = tl.arange(0, G)
    offs_q = tl.arange(0, QB)
    ar = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)

    g_n = rs + ar
    m_n = g_n < re
    qb_n = tl.load(qw_ptr + g_n[:, None] * QB + offs_q[None, :], mask=m_n[:, None], other=0)
    col_n = tl.load(col_ptr + g_n, mask=m_n, other=0)
    s_n = tl.load(s_ptr + g_n, mask=m_n, other=0.0)
    z_n = tl.load(z_ptr + g_n, mask=m_n, other=0)
    c = rs
    while c < re:
        offs_g = c + ar
        mg = offs_g < re
        qb = qb_n
        col = col_n.to(tl.int32)
        s = s_n.to(tl.float32)
        z = z_n.to(tl.float32)
        g_n = offs_g + BLOCK_G
        m_n = g_n < re
        qb_n = tl.load(qw_ptr + g_n[:, None] * QB + offs_q[None, :], mask=m_n[:, None], other=0)
        col_n = tl.load(col_ptr + g_n, mask=m_n, other=0)
        s_n = tl.load(s_ptr + g_n, mask=m_n, other=0.0)
        z_n = tl.load(z_ptr + g_n, mask=m_n, other=0)

        if BITS == 4:
            codes = tl.interleave(qb & 0xF, qb >> 4)
        elif BITS == 2:
            codes = tl.interleave(tl.interleave(qb & 3, (qb >> 4) & 3), tl.interleave((qb >> 2) & 3, qb >> 6))
        else:
            codes = qb
        w = codes.to(tl.float32) - z[:, None]
        kk = col[:, None] * G + offs_e[None, :]
        xm = mask_b[:, None, None] & mg[None, :, None]
        if not EVEN_K:
            xm = xm & (kk < K)[None, :, :]
        xv = tl.load(x_ptr + offs_b[:, None, None] * stride_xb + kk[None, :, :], mask=xm, other=0.0)
        acc += tl.sum(xv.to(tl.float32) * w[None, :, :], axis=2) * s[None, :]
        c += BLOCK_G

    v = tl.sum(acc, axis=1)
    if HAS_BIAS:
        v += tl.load(bias_ptr + r).to(tl.float32)
    tl.store(y_ptr + offs_b * stride_yb + r, v.to(y_ptr.dtype.element_ty), mask=mask_b)


def _expand_kernel(
    qw_ptr, col_ptr, s_ptr, z_ptr, rp_ptr, w_ptr, K, stride_w,
    G: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Dense expansion: program ``r`` writes the kept groups of row ``r`` into a zeroed ``[N, K]``."""
    QB: tl.constexpr = G * BITS // 8
    r = tl.program_id(0)
    rs = tl.load(rp_ptr + r)
    re = tl.load(rp_ptr + r + 1)
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
            codes = tl.interleave(qb & 0xF, qb >> 4)
        elif BITS == 2:
            codes = tl.interleave(tl.interleave(qb & 3, (qb >> 4) & 3), tl.interleave((qb >> 2) & 3, qb >> 6))
        else:
            codes = qb
        w = (codes.to(tl.float32) - z[:, None]) * s[:, None]  # == reference: s·(q − z) in fp32
        kk = col[:, None] * G + offs_e[None, :]
        m = mg[:, None]
        if not EVEN_K:
            m = m & (kk < K)
        tl.store(w_ptr + r.to(tl.int64) * stride_w + kk, w.to(w_ptr.dtype.element_ty), mask=m)
        c += BLOCK_G


_KERNEL_SRC = {"task": _task_kernel, "row": _row_kernel, "expand": _expand_kernel}
_KERNELS: dict = {}


def _kernel(name: str):
    """The jitted kernel for the current mode (interpreter or compiled), made on first use."""
    key = (name, _interpret())
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = triton.jit(_KERNEL_SRC[name])
    return k


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
    num_tasks: int
    num_split_rows: int
    shape: tuple[int, int]
    nnz: int

    @property
    def device(self) -> torch.device:
        return self.table.device


def default_block_g(group_size: int, batch: int = 1) -> int:
    """Groups per chunk: about 2048 weights per chunk at batch 1, fewer with more batch rows so that
    the ``[B, BLOCK_G, G]`` register tile stays near 4096 float32 values."""
    bpad = _next_pow2(batch)
    elems = 2048 if bpad == 1 else max(1024, 8192 // bpad)
    return max(4, elems // group_size)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def build_task_table(
    packed: PackedLinear,
    task_size: int | None = None,
    tasks_per_sm: int = 4,
    block_g: int | None = None,
    num_warps: int = 4,
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
    if block_g is None:
        block_g = default_block_g(packed.group_size)
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
        num_tasks=int(num_tasks),
        num_split_rows=int(split_rows.numel()),
        shape=tuple(int(v) for v in packed.shape),
        nnz=int(nnz),
    )


_TABLE_CACHE: dict = {}


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


def _launch_task(x2, packed, bias, tasks: TaskTable, y):
    bsz, k = x2.shape
    n = packed.shape[0]
    bpad = _next_pow2(bsz)
    block_g = tasks.block_g
    if bpad > 1:  # keep the [B, BLOCK_G, G] tile near 4096-8192 registers' worth
        block_g = min(block_g, default_block_g(packed.group_size, bsz))
    _kernel("task")[(tasks.num_tasks,)](
        x2, packed.qweight, packed.col_idx, packed.scales, packed.zeros, packed.row_ptr, tasks.table, tasks.need,
        tasks.workspace, tasks.counters, bias if bias is not None else y, y,
        n, k, packed.nnz, tasks.task_size, x2.stride(0), y.stride(0), bsz,
        G=packed.group_size, BITS=packed.bits, BLOCK_G=block_g, BLOCK_B=bpad,
        EVEN_K=(k % packed.group_size == 0), HAS_BIAS=bias is not None, WS_STRIDE=_WS_STRIDE,
        num_warps=tasks.num_warps,
    )


def _launch_row(x2, packed, bias, y, block_g=None, num_warps=4):
    bsz, k = x2.shape
    n = packed.shape[0]
    bpad = _next_pow2(bsz)
    if block_g is None:
        avg = max(1, packed.nnz // max(1, n))
        block_g = min(default_block_g(packed.group_size, bsz), max(4, _next_pow2(avg)))
    _kernel("row")[(n,)](
        x2, packed.qweight, packed.col_idx, packed.scales, packed.zeros, packed.row_ptr,
        bias if bias is not None else y, y, k, x2.stride(0), y.stride(0), bsz,
        G=packed.group_size, BITS=packed.bits, BLOCK_G=block_g, BLOCK_B=bpad,
        EVEN_K=(k % packed.group_size == 0), HAS_BIAS=bias is not None, num_warps=num_warps,
    )


def dequantize_dense(packed: PackedLinear, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype``, equal bit for bit to ``reference.dequantize(packed, dtype)``.

    Triton expansion kernel on the GPU (or under ``TRITON_INTERPRET=1``), the reference elsewhere.
    """
    _check_packed(packed)
    dev = packed.row_ptr.device
    if packed.bits not in KERNEL_BITS or not _triton_usable(dev):
        return reference.dequantize(packed, dtype)
    n, k = packed.shape
    w = torch.zeros(n, k, dtype=dtype, device=dev)
    if packed.nnz:
        _kernel("expand")[(n,)](
            packed.qweight, packed.col_idx, packed.scales, packed.zeros, packed.row_ptr, w, k, w.stride(0),
            G=packed.group_size, BITS=packed.bits, BLOCK_G=max(4, 1024 // packed.group_size),
            EVEN_K=(k % packed.group_size == 0), num_warps=4,
        )
    return w


def gqsa_linear(
    x: torch.Tensor,
    packed: PackedLinear,
    bias: torch.Tensor | None = None,
    tasks: TaskTable | None = None,
    variant: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ Ŵᵀ (+ bias)`` for a packed GQSA layer; ``x`` is ``[..., K]``, the result ``[..., N]`` in
    ``x``'s dtype.

    ``variant``: ``"auto"`` (task-centric for ≤ 16 rows of ``x``, dense expand + cuBLAS above),
    ``"task"``, ``"data"``, ``"dense"`` or ``"reference"``. ``"task"``/``"data"`` with more than 16
    rows fall through to ``"dense"``. ``tasks``: the layer's :class:`TaskTable` from
    :func:`build_task_table` (built and memoized here when omitted; pass it to skip the lookup).
    Without a usable Triton (CPU without ``TRITON_INTERPRET=1``, triton missing, 3-bit layers) the
    reference runs. Bad inputs raise ``ValueError`` naming the problem.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}': use one of {VARIANTS}")
    _check_packed(packed)
    _check_x(x, packed, bias)
    n, k = packed.shape
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    bsz = x2.shape[0]
    dev = x.device
    if variant == "reference" or packed.bits not in KERNEL_BITS or not _triton_usable(dev):
        return reference.linear(x, packed, bias)
    if bsz == 0:
        return x.new_empty(*lead, n)
    if variant == "auto":
        variant = "task" if bsz <= MAX_DECODE_BATCH else "dense"
    if bsz > MAX_DECODE_BATCH and variant in ("task", "data"):
        variant = "dense"
    if variant == "dense":
        return F.linear(x, dequantize_dense(packed, x.dtype), bias)
    if x2.stride(-1) != 1 or (bsz > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if out is not None:
        if out.shape != (*lead, n) or out.dtype != x.dtype or out.device != dev or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {[*lead, n]} on {dev}")
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
        _launch_task(x2, packed, bias, tasks, y)
    else:
        _launch_row(x2, packed, bias, y)
    return y.view(*lead, n)
