"""Load-time layout of a packed layer for the batch-1 decode GEMV, and its kernel (``v2``; issue 12).

The on-disk format (``row_ptr / col_idx / qweight / scales / zeros``, :mod:`gqsa.format`) is unchanged;
:func:`build_layout` derives, once per layer (``GemvPlan`` / :func:`gqsa.kernels.gemv.prepare` call it),
a **metadata stream of one 32-bit word per kept group**::

    meta = (col · 2G  |  z)  |  (scale fp16 bits) << 16

— the low half is the group's byte offset in the fp16/bf16 activation row (``col · G`` elements of 2
bytes; its low ``log2(2G)`` bits are zero, so the integer zero point ``z < 2^BITS ≤ 2G`` sits there), the
high half the fp16 scale. 4 bytes per group instead of 5 (2 col + 2 scale + 1 zero), and one load
instead of three. The codes are read where they are (``qweight`` viewed as int32; a zero-padded copy
only for layers of fewer than ``MIN_GROUPS`` kept groups or storage that is not 16-byte aligned). Layers
the word cannot describe — float zero points, ``K`` padded to whole groups above 32768, ``2^BITS > 2G``
(8-bit codes with G < 128) — get no layout (:func:`layout_supported`) and run the ``v1`` kernel.

Kernel (:func:`_gemv2_kernel`): one program per output row, ``num_warps`` warps. A thread *unit* is
``UC`` codes of one kept group (``TPG = G / UC`` threads per group) and their ``UC`` activations; thread
``t`` takes, per step, the units ``t % TPG`` of the groups ``c + t // TPG + (threads / TPG) · j`` for
``j < UPT``: in one load instruction the warp touches *consecutive* kept groups of the row, whose
columns are sorted, so the activation gather (``UC · 2`` bytes per unit, 16-byte loads) hits few L1
lines — a thread taking consecutive groups instead (16-byte loads of its codes and metadata) touches
one line per thread and instruction, 2× the L1 wavefronts (counted offline, see NOTES-gemv.md).
Per unit: one 32-bit metadata load, one ``UC·BITS/8``-byte code load, ``UC/8`` 16-byte activation loads,
all issued for ``UPT`` units before any use. A row runs its whole steps of ``STEP`` groups without
masks, then, if the row's length is not a multiple of ``STEP``, one last step moved back to end at the
row's end (groups counted already or of the neighbouring rows get scale 0). In compiled mode the
loads are inline PTX ``ld.global.nc`` (weights:
``L1::no_allocate`` + an ``L2::evict_first`` policy; activations: cached in L1, every row re-reads
them) and the 4-bit integer-zero math is inline PTX (:data:`_PTX_DEQ4B`: no 16× factor on the odd
codes, the accumulator threaded through the dot); under ``TRITON_INTERPRET=1`` (and for 2- and 8-bit
codes) the same steps run as plain Triton loads and bit arithmetic.

Pipelined kernel (:func:`_gemv2p_kernel`, issue 12, second session): the same step in one flat loop over the
steps of several consecutive rows per program, with the next step's loads issued before the current step's
math and an L2 prefetch a few steps ahead; a packed-fp16 dot (``half_dot``: fp16 lane sums of 8 products; a row
whose sum comes out inf/NaN — a lane overflowed, |x| above ≈ 8700, or an inf/NaN activation — is redone in fp32 by
:func:`_hd_row_fp32`, a rare warp-uniform branch at the row's end; on by default at M = 1 for fp16 W4 G16 / G32 /
G64 / G128 layers above a size in kept codes, :func:`half_dot_default`; ``GQSA_GEMV_HALF=0`` or ``half_dot=False`` opt
out; under the interpreter the same math runs as plain Triton code, :func:`_hd_meta_emu` / :func:`_hdot16_emu`).
:func:`launch` picks the kernel by row length (``LONG_ROW_GROUPS``) and holds every setting as a launch argument
(``GemvPlan(v2_opts=...)`` carries them).

Uniform rows (session 14): where every row keeps the same number of groups (row-balanced masks, what the row
allocation writes), :func:`build_layout` records it (``GemvLayout.keep``) and both kernels take it as the constexpr
``UNI`` with the count as the runtime argument ``keep`` (not a constexpr: layers of other sparsities share one compiled
kernel): a row's groups start at ``row · keep``, so no program waits for a row-pointer load before its first weight
load (``row_ptr`` is still read by the rare fp32 redo of an overflowed row).

Several rows of x (issue gemvb): both kernels take a constexpr ``MB`` (1 … ``MAX_MB`` = 4) and serve ``MB`` rows
of x in one launch: a step's metadata and codes are loaded and dequantized once (:data:`_PTX_DEQ4B`), the
activation loads and the dot run per row of x, into one accumulator per row (a tuple of ``MB`` tensors,
loop-carried); ``MB = 1`` compiles to the same code as the one-row kernel. At M > 1 the launcher picks the
pipelined kernel for every row length (measured faster there).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch

from ..format import PackedLinear
from . import jit
from .jit import _interpret, jitted

try:
    import triton.language as tl
except Exception:  # pragma: no cover - triton is optional
    tl = None

LAYOUT_VERSION = 1  # bump when the meaning of GemvLayout's tensors changes
MAX_X_BYTES = 1 << 16  # the byte offset of a group column must fit in 16 bits
MIN_GROUPS = 4096  # the buffers hold at least this many groups: the largest step (groups per step
# = threads / (G / UC) · UPT) must not exceed it (checked at launch)
V2_NUM_WARPS = 1  # launch defaults (None: default_unit)
V2_UNIT_CODES: dict = {}  # bits -> codes per thread unit
V2_UNITS_PER_THREAD = None
# launch defaults chosen from the H200 measurements of 2026-12-01 (benchmarks/RESULTS.md, "GEMV v2,
# pipelined"): rows of ≥ LONG_ROW_GROUPS kept groups on average run the one-program-per-row kernel
# (_gemv2_kernel, 4 units per thread); shorter rows the pipelined kernel, 2 units per thread, register
# double-buffering and an L2 prefetch 2 steps ahead — layers of at most V2P_MULTI_ROW_MAX_N rows with their
# rows spread over 24 programs per SM, taller ones with one row per program (session 3, call 8, after the
# multi-row fix, spread against one row per program: 4096² 5.35 µs against 6.37, 11008×4096 10.30 against
# 11.33, 14336×4096 12.23 against 13.55, 8192² 13.81 against 13.73; 28672×8192 39.03 against 36.66).
LONG_ROW_GROUPS = 320
V2P_UNITS_PER_THREAD = 2
V2P_ROWS_PER_PROG = 1  # rows per program of the pipelined kernel above V2P_MULTI_ROW_MAX_N rows
V2P_MULTI_ROW_MAX_N = 16384  # up to this many rows: spread over V2P_PROGRAMS_PER_SM programs per SM
V2P_PROGRAMS_PER_SM = 24
V2P_REG = True  # register double-buffering of the next step's loads
V2P_PREFETCH = 2  # L2 prefetch distance in steps (0: none)
# The packed-fp16 dot (half_dot, the pipelined kernel's HALF; issue 12, sessions 5 and 6): launch's default
# (half_dot=None) takes it for one row of x, fp16 activations, 4-bit codes, G in HALF_GROUPS (16-code units: a G32
# / G64 / G128 group is 2 / 4 / 8 units of one metadata word), inline PTX, on layers of ≥ HALF_MIN_CODES (G16)
# or HALF_WIDE_MIN_CODES (G32, G64, G128) kept codes (kept groups · G), whatever their row length: the pipelined
# kernel with rows spread over V2P_PROGRAMS_PER_SM programs per SM (also above V2P_MULTI_ROW_MAX_N rows), register
# double-buffering, prefetch 2, and the units per thread of half_dot_units: 2, or 4 with ptxas limited to
# HALF_MAXNREG registers — G16 from HALF_U4_MIN_CODES kept codes (the 70B shapes), G32 / G64 / G128 where the rows
# average ≥ HALF_WIDE_U4_ROW_CODES kept codes (a step of 4 units per thread covers 32 · 4 · 16 codes: a short row in fewer,
# emptier steps). The thresholds count codes (session 5 set G16's in groups: 2^20 and 4 · 2^20 groups = 16 · 2^20
# and 64 · 2^20 codes).
# Measured (H200, graph µs, half dot against the fp32 default, benchmarks/RESULTS.md): session 5, W4 S50 G16:
# 8192×28672 31.86 against 35.79 (u4 m80), 28672×8192 31.81 / 37.29 (u4 m80), 22016×4096 14.19 / 18.48, 8192²
# 11.96 / 13.85, 14336×4096 10.70 / 12.12, 4096×14336 10.74 / 12.06, 12288×4096 9.42 / 10.39, 11008×4096 9.04 /
# 10.14, 4096×11008 9.77 / 10.06 (u2); 4096² 5.26 (u2) / 5.59 (u4 m80) against 5.25-5.33: no gain, so below the
# threshold (8.4 M codes at S50). Session 6 ("Session 6: half dot for G64"), call 2, W4 S30 G64, the default
# against auto f32: 4096² 5.73 / 6.82, 12288×4096 11.35 / 14.46, 22016×4096 17.91 / 23.03 (u2: rows of 2880 codes;
# u4 m80 6.02 / 12.45 / 19.32), 4096×11008 9.33 / 12.88, 8192² 13.36 / 19.71, 8192×28672 35.91 / 58.34, 28672×8192
# 36.39 / 49.81 (u4 m80: rows of ≥ 5760 codes; u2 10.32 / 15.31 / 44.18 / 44.79), 1024×8192 4.53 / 6.29 (u4),
# 2048×4096 4.35 / 4.80, 1024×4096 3.85 / 4.26 (u2; u4 m80 3.72); W4 S50 G64 4096² 4.68 / 5.30, 1024×4096 (2.0 M
# codes, the smallest measured) 3.39 / 3.75. W4 S30 G32 (gemv's auto ran v1 at G32 until session 7; now v2),
# half dot against the fp32 dot at the same settings (u2): 4096² 6.13 / 7.47, 12288×4096 11.87 /
# 15.53, 4096×11008 10.48 (u4 m80) / 15.22, 8192² 14.24 (u4 m80) / 21.29, call 1: 22016×4096 18.61 / 25.00,
# 8192×28672 38.36 (u4 m80) / 55.48 (fp32 u4 m80). Session 7, W4 S0 G128 (what 3-bit layers run as), the default
# (u4 m80: rows of ≥ 4096 codes) against auto f32: 4096² 5.97 / 7.80, 12288×4096 12.66 / 17.46, 22016×4096 18.99 /
# 27.57, 4096×11008 11.93 / 16.44, 28672×8192 46.21 / 63.43. Rows whose fp16 lane sums overflow are redone in fp32
# (_hd_row_fp32). Opt-out: half_dot=False (GemvPlan(v2_opts={"half_dot": False})) or GQSA_GEMV_HALF=0 at import;
# GQSA_GEMV_HALF=1 takes it wherever it applies (any layer size, M = 1-4), "auto" (the default) as above and, since
# session 8, at M = 2 … HALF_WIDE_BATCH_MAX_M rows for G in HALF_WIDE_BATCH_GROUPS, any size, HALF_UNITS_PER_THREAD
# units and no register limit (half_dot_units). Session 8 call 3 (benchmarks/gemv.py --half-batch, graph µs, the
# fp32 dot against the half dot, 2 units): W4 S0 G128 M = 2 4096² 9.56 / 8.16, 12288×4096 22.83 / 18.49, 4096×11008
# 21.24 / 17.66, 28672×8192 86.74 / 73.99; W4 S30 G64 M = 2 8.03 / 7.07, 18.16 / 14.92, 16.37 / 13.63, 67.03 / 57.76,
# M = 3 9.19 / 8.71, 24.93 / 19.87, 19.18 / 17.59, 85.14 / 77.94. At G16 (call 1, W4 S50 G16, a variant that
# dequantized once for all rows) the half dot was no faster at M = 2-8: there the rows' activation gathers bound it.
HALF_DOT_DEFAULT = os.environ.get("GQSA_GEMV_HALF", "auto").strip().lower()
if HALF_DOT_DEFAULT not in ("auto", "0", "1"):
    raise ValueError(f"GQSA_GEMV_HALF={HALF_DOT_DEFAULT!r}: use auto, 0 or 1")
HALF_GROUPS = (16, 32, 64, 128)
HALF_MIN_CODES = 16 << 20  # G16
HALF_UNITS_PER_THREAD = 2
HALF_U4_MIN_CODES = 64 << 20  # G16: from here 4 units per thread and maxnreg HALF_MAXNREG
HALF_WIDE_MIN_CODES = 2 << 20  # G32 / G64 / G128 (the smallest layer measured faster: 1024×4096 W4 S50 G64)
HALF_WIDE_U4_ROW_CODES = 4096  # G32 / G64 / G128: 4 units per thread, maxnreg HALF_MAXNREG from here (codes a row)
HALF_MAXNREG = 80
HALF_WIDE_BATCH_GROUPS = (64, 128)  # "auto": the half dot at 2 … HALF_WIDE_BATCH_MAX_M rows of x for these G
HALF_WIDE_BATCH_MAX_M = 3
MAX_MB = 4  # rows of x one launch of the v2 kernels serves (the constexpr MB: weights read once for all)
# M = 2-4 rows of x run the pipelined kernel whatever the row length: on the long-row shapes it beat the
# one-program-per-row kernel at every M ≥ 2 (H200, 2026-12-01, benchmarks/RESULTS.md "GEMV v2 at M = 2-4":
# 4096×11008 14.9 / 19.8 / 24.4 µs against 20.6 / 28.6 / 34.0 at M = 2 / 3 / 4; 8192×28672 57.3 / 81.4 / 107.8
# against 64.2 / 88.4 / 127.5)


def default_unit(group_size: int, bits: int) -> tuple[int, int]:
    """(UC codes per thread unit, UPT units per thread and step): 16 codes (8 for 8-bit: 16 bytes of
    codes and activations), 4 units in flight per thread."""
    uc = 16 if bits <= 4 else 8
    return min(uc, group_size), 4


def layout_supported(packed: PackedLinear) -> bool:
    g, b = packed.group_size, packed.bits
    kp = packed.n_group_cols * g
    return (b in (2, 4, 8) and not packed.float_zeros and kp * 2 <= MAX_X_BYTES and (1 << b) <= 2 * g
            and g * b % 32 == 0 and packed.zeros.dtype == torch.uint8)


@dataclass
class GemvLayout:
    """What the v2 kernel reads besides ``row_ptr`` and the activations (see the module docstring)."""

    meta: torch.Tensor  # int32 [max(nnz, MIN_GROUPS)]
    codes: torch.Tensor | None  # int32 [max(nnz, MIN_GROUPS) · G·BITS/32], 16-byte aligned
    version: int
    shape: tuple
    nnz: int
    keep: int = 0  # kept groups of every row where all rows keep the same number (row allocation), else 0


def uniform_keep(packed: PackedLinear) -> int:
    """The number of kept groups of every row where all rows keep the same number (what row-balanced masks give),
    else 0: the v2 kernels then find a row's groups at ``row · keep`` without loading the row pointers (the load
    every program waits for before its first weight load)."""
    n = packed.shape[0]
    if not n or not packed.nnz or packed.nnz % n:
        return 0
    counts = packed.row_ptr[1:] - packed.row_ptr[:-1]
    keep = packed.nnz // n
    return keep if bool((counts == keep).all()) else 0


def build_layout(packed: PackedLinear) -> GemvLayout | None:
    """The load-time layout of ``packed`` (``None`` where :func:`layout_supported` says no)."""
    if not layout_supported(packed):
        return None
    g, b, nnz = packed.group_size, packed.bits, packed.nnz
    dev = packed.row_ptr.device
    rows = max(nnz, MIN_GROUPS)  # a step reads STEP ≤ MIN_GROUPS groups from index ≥ 0
    meta = torch.zeros(rows, dtype=torch.int32, device=dev)
    if nnz:
        off = packed.col_idx.to(torch.int32) * (2 * g) | packed.zeros.to(torch.int32)
        sbits = packed.scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        meta[:nnz] = off | (sbits << 16)
    q = packed.qweight
    if nnz >= MIN_GROUPS and q.data_ptr() % 16 == 0:
        codes = q.reshape(-1).view(torch.int32)
    else:  # a small layer (padded copy) or unaligned storage
        codes = torch.zeros(rows * g * b // 32, dtype=torch.int32, device=dev)
        if nnz:
            codes[: nnz * g * b // 32] = q.reshape(-1).view(torch.int32)
    return GemvLayout(meta=meta, codes=codes, version=LAYOUT_VERSION, shape=tuple(packed.shape), nnz=nnz,
                      keep=uniform_keep(packed))


_LAYOUT_CACHE: dict = {}


def cached_layout(packed: PackedLinear) -> GemvLayout | None:
    """:func:`build_layout`, memoized on the identity (and in-place versions) of the layer's tensors.
    The memo holds the metadata stream but no view of ``qweight`` (it would keep the weights alive)."""
    q = packed.qweight
    versions = (q._version, packed.scales._version, packed.zeros._version, packed.col_idx._version,
                packed.row_ptr._version)
    hit = _LAYOUT_CACHE.get(id(q))
    if hit is not None and hit[0]() is q and hit[1] == versions:
        lay = hit[2]
        if lay is None:
            return None
        if lay.nnz == packed.nnz and lay.shape == tuple(packed.shape):
            if lay.codes is None:
                return GemvLayout(meta=lay.meta, codes=q.reshape(-1).view(torch.int32), version=lay.version,
                                  shape=lay.shape, nnz=lay.nnz, keep=lay.keep)
            return lay
    lay = build_layout(packed)
    memo = lay
    if lay is not None and lay.codes.data_ptr() == q.data_ptr():  # a view: rebuilt on every hit
        memo = GemvLayout(meta=lay.meta, codes=None, version=lay.version, shape=lay.shape, nnz=lay.nnz, keep=lay.keep)
    _LAYOUT_CACHE[id(q)] = (weakref.ref(q), versions, memo)
    if len(_LAYOUT_CACHE) > 1024:
        for k in [k for k, v in _LAYOUT_CACHE.items() if v[0]() is None]:
            del _LAYOUT_CACHE[k]
    return lay


# ============================================================================ kernel

# 16-byte loads. Weights: read once, keep them out of L1 and mark them first to leave L2.
_PTX_LDW4 = """{
.reg .b64 pol;
createpolicy.fractional.L2::evict_first.b64 pol, 1.0;
ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {$0, $1, $2, $3}, [$4], pol;
}"""
_PTX_LDW2 = """{
.reg .b64 pol;
createpolicy.fractional.L2::evict_first.b64 pol, 1.0;
ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {$0, $1}, [$2], pol;
}"""
_PTX_LDW1 = """{
.reg .b64 pol;
createpolicy.fractional.L2::evict_first.b64 pol, 1.0;
ld.global.nc.L1::no_allocate.L2::cache_hint.u32 $0, [$1], pol;
}"""
# activations: re-read by every row, keep them in L1
_PTX_LDX4 = "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];"
# L2 prefetch of one 128-byte line where $2 != 0 ($0: a dummy result)
_PTX_PREFL2 = """{
.reg .pred p;
setp.ne.s32 p, $2, 0;
@p prefetch.global.L2 [$1];
mov.b32 $0, 0;
}"""
# programmatic dependent launch (gqsa.kernels.jit): wait for the earlier kernels; $0 = 0, added to the
# activation pointers so that no activation load (pure inline asm, free to move) is issued before the wait
_PTX_PDL_WAIT = """griddepcontrol.wait;
mov.b32 $0, 0;"""
# metadata word -> (c0 = 2^23 + z, c1 = 2^19 + z, scale) for the 4-bit path (exact: c1 = c0 − (2^23 − 2^19))
_PTX_META4 = """{
.reg .b16 l, h;
lop3.b32 $0, $3, 0xF, 0x4B000000, 0xEA;
sub.f32 $1, $0, 0f4AF00000;
mov.b32 {l, h}, $3;
cvt.f32.f16 $2, h;
}"""
# 8 codes of a 32-bit word -> q − z in float32, exactly, with no integer-to-float conversion: the even
# code of byte k (bits 8k … 8k+3, shifted to bits 0-3) OR-ed into the mantissa of 2^23 is 2^23 + q; the
# odd code (bits 4-7) OR-ed into the mantissa of 2^19 (ulp 2^-4) is 2^19 + q; one FADD of c0 = 2^23 + z
# or c1 = 2^19 + z leaves q − z. ($8: the word, $9: c0, $10: c1)
_PTX_DEQ4B = """{
.reg .b32 m0, m1, t, u;
mov.b32 m0, 0x4B000000;
mov.b32 m1, 0x49000000;
lop3.b32 t, $8, 0xF, m0, 0xEA;   sub.f32 $0, t, $9;
lop3.b32 t, $8, 0xF0, m1, 0xEA;  sub.f32 $1, t, $10;
shr.u32 u, $8, 8;
lop3.b32 t, u, 0xF, m0, 0xEA;    sub.f32 $2, t, $9;
lop3.b32 t, u, 0xF0, m1, 0xEA;   sub.f32 $3, t, $10;
shr.u32 u, $8, 16;
lop3.b32 t, u, 0xF, m0, 0xEA;    sub.f32 $4, t, $9;
lop3.b32 t, u, 0xF0, m1, 0xEA;   sub.f32 $5, t, $10;
shr.u32 u, $8, 24;
lop3.b32 t, u, 0xF, m0, 0xEA;    sub.f32 $6, t, $9;
lop3.b32 t, u, 0xF0, m1, 0xEA;   sub.f32 $7, t, $10;
}"""
# $0 = $13 + Σ x·d over 8 codes; $1..$4: activation pairs (low half = even element), $5..$12: q − z
_PTX_DOTA_F16 = """{
.reg .b16 l, h;
.reg .f32 a, v;
mov.b32 {l, h}, $1;
cvt.f32.f16 v, l;  fma.rn.f32 a, v, $5, $13;
cvt.f32.f16 v, h;  fma.rn.f32 a, v, $6, a;
mov.b32 {l, h}, $2;
cvt.f32.f16 v, l;  fma.rn.f32 a, v, $7, a;
cvt.f32.f16 v, h;  fma.rn.f32 a, v, $8, a;
mov.b32 {l, h}, $3;
cvt.f32.f16 v, l;  fma.rn.f32 a, v, $9, a;
cvt.f32.f16 v, h;  fma.rn.f32 a, v, $10, a;
mov.b32 {l, h}, $4;
cvt.f32.f16 v, l;  fma.rn.f32 a, v, $11, a;
cvt.f32.f16 v, h;  fma.rn.f32 $0, v, $12, a;
}"""
_PTX_DOTA_BF16 = """{
.reg .b32 v;
.reg .f32 a;
shl.b32 v, $1, 16;          fma.rn.f32 a, v, $5, $13;
and.b32 v, $1, 0xFFFF0000;  fma.rn.f32 a, v, $6, a;
shl.b32 v, $2, 16;          fma.rn.f32 a, v, $7, a;
and.b32 v, $2, 0xFFFF0000;  fma.rn.f32 a, v, $8, a;
shl.b32 v, $3, 16;          fma.rn.f32 a, v, $9, a;
and.b32 v, $3, 0xFFFF0000;  fma.rn.f32 a, v, $10, a;
shl.b32 v, $4, 16;          fma.rn.f32 a, v, $11, a;
and.b32 v, $4, 0xFFFF0000;  fma.rn.f32 $0, v, $12, a;
}"""

# half-precision dot (opt-in, fp16 activations, 4 bits; issue 12): metadata word -> ($0) the half2 pair
# −(64 + z/16, 4 + z/16) and ($1) the fp32 scale
_PTX_META4H = """{
.reg .b32 z;
.reg .b16 l, h;
and.b32 z, $2, 0xF;
mad.lo.u32 $0, z, 0x100001, 0xC400D400;
mov.b32 {l, h}, $2;
cvt.f32.f16 $1, h;
}"""
# one unit of 16 codes ($1, $2) against 16 fp16 activations ($3..$10): $0 = Σ x·(q − z) / 16 in fp32. Byte k of
# a code word, replicated (prmt), masked into the mantissas of 1024.0 (low half: the even code) and 1024.0
# (high half, the odd code at bits 4-7: 1024 + 16q) gives the half2 (1024 + q0, 1024 + 16·q1); one fma with
# (1/16, 1/256) and $11 = −(64 + z/16, 4 + z/16) leaves ((q0 − z)/16, (q1 − z)/16) exactly, which meets the
# activation word (x_2k, x_2k+1) as it is; the 8 products per half lane add up in an fp16 fma chain
# (|sum| ≤ 7.5·max|x|: no overflow below |x| = 8700), then both lanes go to fp32.
_PTX_HDOT16 = """{
.reg .b32 p, d, a, mul;
.reg .b16 l, h;
.reg .f32 fl, fh;
mov.b32 mul, 0x1C002C00;
prmt.b32 p, $1, 0, 0x0000; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
mul.rn.f16x2 a, d, $3;
prmt.b32 p, $1, 0, 0x1111; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
fma.rn.f16x2 a, d, $4, a;
prmt.b32 p, $1, 0, 0x2222; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
fma.rn.f16x2 a, d, $5, a;
prmt.b32 p, $1, 0, 0x3333; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
fma.rn.f16x2 a, d, $6, a;
prmt.b32 p, $2, 0, 0x0000; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
fma.rn.f16x2 a, d, $7, a;
prmt.b32 p, $2, 0, 0x1111; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
fma.rn.f16x2 a, d, $8, a;
prmt.b32 p, $2, 0, 0x2222; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
fma.rn.f16x2 a, d, $9, a;
prmt.b32 p, $2, 0, 0x3333; lop3.b32 d, p, 0x00F0000F, 0x64006400, 0xEA; fma.rn.f16x2 d, d, mul, $11;
fma.rn.f16x2 a, d, $10, a;
mov.b32 {l, h}, a;
cvt.f32.f16 fl, l;
cvt.f32.f16 fh, h;
add.f32 $0, fl, fh;
}"""

if tl is not None:  # what the kernel reads as globals must be constexpr
    LDW4, LDW2, LDW1, LDX4, META4, DEQ4B, PREFL2, META4H, HDOT16, PDL_WAIT = (tl.constexpr(v) for v in (
        _PTX_LDW4, _PTX_LDW2, _PTX_LDW1, _PTX_LDX4, _PTX_META4, _PTX_DEQ4B, _PTX_PREFL2, _PTX_META4H, _PTX_HDOT16,
        _PTX_PDL_WAIT))


def _hd_row_fp32(x_ptr, cw_ptr, meta_ptr, rp_ptr, row, G: tl.constexpr, UC: tl.constexpr, NUM_THREADS: tl.constexpr,
                 one):
    """Σ over the kept groups of output row ``row`` of s·Σ x·(q − z), in fp32 from plain loads (4-bit codes, fp16
    activations; ``x_ptr``: the row of x as int32 words): the packed-fp16 dot's redo of a row whose sum came out
    inf or NaN (an fp16 lane sum overflowed, |x| above ≈ 8700, or an activation is inf/NaN — then the redo gives
    NaN/inf as the fp32 path does). Rare and warp-uniform (a branch on the row's reduced sum); units of ``UC``
    codes, ``NUM_THREADS`` at a time."""
    TPG: tl.constexpr = G // UC
    WPU: tl.constexpr = UC // 8  # code words per unit
    XPU: tl.constexpr = UC // 2  # activation words per unit
    CWG: tl.constexpr = G // 8  # code words per group
    OFFM: tl.constexpr = 0xFFFF ^ (2 * G - 1)
    rs = tl.load(rp_ptr + row)
    nu = (tl.load(rp_ptr + row + 1) - rs) * TPG  # units of the row
    t = tl.arange(0, NUM_THREADS) * one
    acc = tl.full([NUM_THREADS], 0.0, tl.float32)
    k0 = nu * 0
    while k0 < nu:
        k = k0 + t
        ok = k < nu
        g = rs + k // TPG
        m = tl.load(meta_ptr + g, mask=ok, other=0)
        zq = (m & 0xF).to(tl.float32)
        sc = (m >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xp = x_ptr + ((m & OFFM) >> 2) + (k % TPG) * XPU
        cp = cw_ptr + g * CWG + (k % TPG) * WPU
        su = tl.full([NUM_THREADS], 0.0, tl.float32)
        for w in tl.static_range(WPU):
            cw = tl.load(cp + w, mask=ok, other=0)
            for e in tl.static_range(8):
                q = ((cw >> (4 * e)) & 0xF).to(tl.float32)
                xword = tl.load(xp + (w * 8 + e) // 2, mask=ok, other=0)
                xf = (xword >> (16 * (e % 2))).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                su = su + xf * (q - zq)
        acc = acc + tl.where(ok, su * sc, 0.0)
        k0 = k0 + NUM_THREADS
    return tl.reduce(acc, 0, tl.standard._sum_combine)


def _hd_meta_emu(m):
    """:data:`_PTX_META4H` in plain Triton (the interpreter's half dot): metadata word -> (the half2 pair
    −(64 + z/16, 4 + z/16) as an int32, the fp32 scale)."""
    z = m & 0xF
    negc = z * 0x100001 + (0xC400D400 - (1 << 32))  # (int32 arithmetic, wrapping as mad.lo.u32)
    sc = (m >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return negc, sc


def _f16_lo(w):
    """The low fp16 half of int32 words, as fp32."""
    return (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _f16_hi(w):
    return ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _hdot16_emu(c0, c1, x0, x1, x2, x3, x4, x5, x6, x7, negc):
    """:data:`_PTX_HDOT16` in plain Triton (the interpreter's half dot; not compiled: the compiled half dot is the
    PTX): one unit of 16 codes (``c0``, ``c1``) against 16 fp16 activations (``x0`` … ``x7``, pairs) -> Σ x·(q − z)
    / 16 in fp32, with the PTX's steps and roundings: each code byte masked into the mantissas of 1024.0 (even
    code: 1024 + q, odd code: 1024 + 16q), one fma with (1/16, 1/256) and ``negc`` giving (q − z)/16 exactly; per
    half lane the first product rounded to fp16, then 7 fp16 fmas (emulated as an fp32 sum rounded to fp16: the
    product of two fp16 values is exact in fp32), the two lanes added in fp32. An fp16 lane that overflows gives
    inf as on the GPU."""
    nlo = _f16_lo(negc)
    nhi = _f16_hi(negc)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    alo = nlo * 0.0
    ahi = nlo * 0.0
    for k in tl.static_range(8):
        if k < 4:
            byte = (c0 >> (8 * k)) & 0xFF
        else:
            byte = (c1 >> (8 * (k - 4))) & 0xFF
        dlo = (_f16_lo((byte & 0xF) | 0x6400) * 0.0625 + nlo).to(tl.float16).to(tl.float32)
        dhi = (_f16_lo((byte & 0xF0) | 0x6400) * 0.00390625 + nhi).to(tl.float16).to(tl.float32)
        if k == 0:
            alo = (_f16_lo(xs[k]) * dlo).to(tl.float16).to(tl.float32)
            ahi = (_f16_hi(xs[k]) * dhi).to(tl.float16).to(tl.float32)
        else:
            alo = (_f16_lo(xs[k]) * dlo + alo).to(tl.float16).to(tl.float32)
            ahi = (_f16_hi(xs[k]) * dhi + ahi).to(tl.float16).to(tl.float32)
    return alo + ahi


def _prefetch_step(meta_ptr, cw_ptr, pg, t, ML: tl.constexpr, CL: tl.constexpr, CWG: tl.constexpr,
                   NUM_THREADS: tl.constexpr):
    """L2 prefetch of the step of groups from ``pg``: lanes 0 … ML−1 its metadata's 128-byte lines, ML … ML+CL−1 its
    codes' (``prefetch.global.L2``; compiled mode only)."""
    for q in tl.static_range(0, ML + CL, NUM_THREADS):
        ln = t + q
        pa = tl.where(ln < ML, (meta_ptr + pg + ln * 32).to(tl.pointer_type(tl.int8)),
                      (cw_ptr + pg * CWG + (ln - ML) * 32).to(tl.pointer_type(tl.int8)))
        tl.inline_asm_elementwise(PREFL2, "=r,l,r", [pa, (ln < ML + CL).to(tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)


if tl is not None:  # called from the pipelined kernel (HALF / ASM only: compiled mode), so jitted once here
    import triton as _triton

    hd_row_fp32 = _triton.jit(_hd_row_fp32)
    prefetch_step = _triton.jit(_prefetch_step)
    FP32_MAX = tl.constexpr(3.4028234663852886e38)
    # the interpreter's half dot calls the plain functions (an interpreted kernel cannot call a compiled-mode
    # @triton.jit function); wrapped as constexprs, which the compiled kernel may reference (in branches it does not
    # compile) where Triton refuses a plain function
    HD_ROW_EMU, HD_META_EMU, HDOT16_EMU = (tl.constexpr(f) for f in (_hd_row_fp32, _hd_meta_emu, _hdot16_emu))


def _gemv2_kernel(
    x_ptr, x8_ptr, cw_ptr, meta_ptr, rp_ptr, bias_ptr, y_ptr, XS, YS, one, keep,
    G: tl.constexpr, BITS: tl.constexpr, UC: tl.constexpr, UPT: tl.constexpr, X_BF16: tl.constexpr,
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr, DOT: tl.constexpr, NUM_THREADS: tl.constexpr, PDL: tl.constexpr,
    MB: tl.constexpr = 1, UNI: tl.constexpr = False,
):
    """y[i, r] = Σ over the kept groups of row r of s·Σ x[i]·(q − z) (+ bias[r]) for the ``MB`` rows ``i`` of x
    (1 … 4); one program per output row.

    ``x_ptr``: the activation rows as int32 words (2 halves each), zero-padded to whole groups, ``XS`` words
    apart (16-byte aligned; ``x8_ptr``: the same bytes, addressed by the inline-PTX loads); ``cw_ptr``: codes
    as int32 words (``G·BITS/32`` per group); ``meta_ptr``: one word per group (module docstring); ``y_ptr``:
    rows ``YS`` elements apart. Batched (``MB > 1``): the weights are read and dequantized once per step, the
    activation loads and the dot run per row of x, one accumulator per row (a tuple); ``MB = 1`` compiles to
    the kernel of one row (``XS`` and ``YS`` unused).
    """
    TPG: tl.constexpr = G // UC  # threads per group
    SLOT: tl.constexpr = NUM_THREADS // TPG  # groups per unit slot
    WPU: tl.constexpr = UC * BITS // 32  # code words per unit
    XPU: tl.constexpr = UC // 2  # activation words per unit
    CPW: tl.constexpr = 32 // BITS  # codes per code word
    QM: tl.constexpr = (1 << BITS) - 1
    OFFM: tl.constexpr = 0xFFFF ^ (2 * G - 1)  # the byte-offset bits of a metadata word
    r = tl.program_id(0)
    if UNI:  # every row keeps `keep` groups: no row-pointer load ahead of the weights'
        rs = r * keep
        re = rs + keep
    else:
        rs = tl.load(rp_ptr + r)
        re = tl.load(rp_ptr + r + 1)
    STEP: tl.constexpr = SLOT * UPT  # groups per step
    t = tl.arange(0, NUM_THREADS) * one
    h = t % TPG  # which unit of its group
    u = t // TPG  # the thread's group within a slot
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): x only after the wait (xz = 0 depends on it)
        xz = tl.inline_asm_elementwise(PDL_WAIT, "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.extra.cuda.gdc_launch_dependents()
    else:
        xz = 0
    xb = x8_ptr + h * (2 * UC) + xz  # the unit's activations start 2·UC·h bytes into the group's
    xi = x_ptr + h * XPU + xz
    accs = ()  # one accumulator per row of x
    for mb in tl.static_range(MB):
        accs = accs + (tl.full([NUM_THREADS], 0.0, tl.float32),)
    c = rs
    # two copies of the step loop (unrolled at compile time): LAST = 0 runs the whole steps inside the
    # row, no masks; LAST = 1 the partial last step, if any, moved back to end at the row's end
    # (b = re − STEP; for a short row or layer b = 0: the buffers hold ≥ STEP groups), so that every
    # address is a step base plus a constant; there, the groups below c (counted by the whole steps or
    # of the rows before) and from re on get scale 0
    for LAST in tl.static_range(2):
        while (c + STEP <= re) if LAST == 0 else (c < re):  # (while: the interpreter needs run-time bounds)
            if LAST == 0:
                b = c
            else:
                b = tl.maximum(re - STEP, 0)
            gt = b + u  # the thread's group in slot 0
            mp0 = meta_ptr + gt
            cp0 = cw_ptr + gt * (G * BITS // 32) + h * WPU
            # metadata and codes of the UPT units, all loads before any use
            metas = ()
            codes = ()
            for j in tl.static_range(UPT):
                mp = mp0 + j * SLOT
                cp = cp0 + j * SLOT * (G * BITS // 32)
                if ASM:
                    metas = metas + (tl.inline_asm_elementwise(LDW1, "=r,l", [mp], dtype=tl.int32, is_pure=True,
                                                               pack=1),)
                    if WPU == 4:
                        w0, w1, w2, w3 = tl.inline_asm_elementwise(LDW4, "=r,=r,=r,=r,l", [cp], dtype=(tl.int32,) * 4,
                                                                   is_pure=True, pack=1)
                        codes = codes + (w0, w1, w2, w3)
                    elif WPU == 2:
                        w0, w1 = tl.inline_asm_elementwise(LDW2, "=r,=r,l", [cp], dtype=(tl.int32,) * 2, is_pure=True,
                                                           pack=1)
                        codes = codes + (w0, w1)
                    else:
                        codes = codes + (tl.inline_asm_elementwise(LDW1, "=r,l", [cp], dtype=tl.int32, is_pure=True,
                                                                   pack=1),)
                else:
                    metas = metas + (tl.load(mp),)
                    for i in tl.static_range(WPU):
                        codes = codes + (tl.load(cp + i),)
            for j in tl.static_range(UPT):
                m = metas[j]
                if ASM and BITS == 4:
                    c0, c1, sc = tl.inline_asm_elementwise(META4, "=f,=f,=f,r", [m], dtype=(tl.float32,) * 3,
                                                           is_pure=True, pack=1)
                else:
                    zq = (m & QM).to(tl.float32)
                    sc = (m >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                xw = ()  # the unit's XPU activation words of every row of x, row after row
                for mb in tl.static_range(MB):
                    for i in tl.static_range(0, XPU, 4):
                        if ASM:
                            x0, x1, x2, x3 = tl.inline_asm_elementwise(
                                LDX4, "=r,=r,=r,=r,l", [(xb + mb * (4 * XS)) + (m & OFFM) + 4 * i],
                                dtype=(tl.int32,) * 4, is_pure=True, pack=1)
                        else:
                            xp = (xi + mb * XS) + ((m & OFFM) >> 2)  # the unit's first activation word
                            x0 = tl.load(xp + i)
                            x1 = tl.load(xp + i + 1)
                            x2 = tl.load(xp + i + 2)
                            x3 = tl.load(xp + i + 3)
                        xw = xw + (x0, x1, x2, x3)
                rgs = ()
                for mb in tl.static_range(MB):
                    rgs = rgs + (tl.full([NUM_THREADS], 0.0, tl.float32),)
                for w in tl.static_range(WPU):
                    cw = codes[j * WPU + w]
                    if ASM and BITS == 4:  # the codes dequantized once, the dot per row of x
                        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                            DEQ4B, "=f,=f,=f,=f,=f,=f,=f,=f,r,f,f", [cw, c0, c1], dtype=(tl.float32,) * 8,
                            is_pure=True, pack=1)
                        nrgs = ()
                        for mb in tl.static_range(MB):
                            nrgs = nrgs + (tl.inline_asm_elementwise(
                                DOT, "=f,r,r,r,r,f,f,f,f,f,f,f,f,f",
                                [xw[mb * XPU + 4 * w], xw[mb * XPU + 4 * w + 1], xw[mb * XPU + 4 * w + 2],
                                 xw[mb * XPU + 4 * w + 3],
                                 d0, d1, d2, d3, d4, d5, d6, d7, rgs[mb]],
                                dtype=tl.float32, is_pure=True, pack=1),)
                        rgs = nrgs
                    else:
                        for e in tl.static_range(CPW):
                            q = ((cw >> (e * BITS)) & QM).to(tl.float32)
                            nrgs = ()
                            for mb in tl.static_range(MB):
                                xword = xw[mb * XPU + (w * CPW + e) // 2]
                                xh = (xword >> (16 * ((w * CPW + e) % 2))).to(tl.int16)
                                if X_BF16:
                                    xf = xh.to(tl.bfloat16, bitcast=True).to(tl.float32)
                                else:
                                    xf = xh.to(tl.float16, bitcast=True).to(tl.float32)
                                nrgs = nrgs + (rgs[mb] + xf * (q - zq),)
                            rgs = nrgs
                if LAST == 0:
                    f = sc
                else:  # groups outside [c, re) get scale 0: their dot is finite (real codes and activations)
                    # unless an activation is inf/NaN
                    f = tl.where((gt + j * SLOT - c).to(tl.uint32) < (re - c).to(tl.uint32), sc, 0.0)
                naccs = ()
                for mb in tl.static_range(MB):
                    naccs = naccs + (accs[mb] + rgs[mb] * f,)
                accs = naccs
            c = b + STEP
    for mb in tl.static_range(MB):
        v = tl.reduce(accs[mb], 0, tl.standard._sum_combine)
        if HAS_BIAS:
            v += tl.load(bias_ptr + r).to(tl.float32)
        tl.store((y_ptr + mb * YS) + r, v.to(y_ptr.dtype.element_ty))


def _gemv2p_kernel(
    x_ptr, x8_ptr, cw_ptr, meta_ptr, rp_ptr, bias_ptr, y_ptr, N, RPP, MAXG, XS, YS, one, keep,
    G: tl.constexpr, BITS: tl.constexpr, UC: tl.constexpr, UPT: tl.constexpr, X_BF16: tl.constexpr,
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr, DOT: tl.constexpr, NUM_THREADS: tl.constexpr,
    REG: tl.constexpr, PF: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr, MB: tl.constexpr = 1,
    UNI: tl.constexpr = False,
):
    """The v2 step over the steps of ``RPP`` consecutive rows (rows ``p·RPP`` …) in one flat loop,
    pipelined: every row is ≥ 1 step (a row's partial last step moved back to end at the row's end as
    in :func:`_gemv2_kernel`, an empty row one step of scale 0; every step masked: groups outside
    [c, row end) get scale 0); the row ends of the next row are loaded one iteration ahead; the sum of
    a row goes out at the top of the iteration after its last step.

    ``REG = 1``: register double-buffering: an iteration issues the metadata and code loads of the
    *next* step (possibly of the next row) before the math of the current one. ``PF > 0`` (compiled
    only): the iteration also prefetches into L2 (``prefetch.global.L2``, one 128-byte line per lane)
    the metadata and codes of the groups ``PF`` steps ahead in the program's flat group stream (rows
    are consecutive, so their groups are), clamped to the buffers (``MAXG`` groups): DRAM latency
    is taken off the loads with no registers held. ``HALF`` (4 bits, 16-code units — G16 one unit a group,
    G32 / G64 / G128 two / four / eight units sharing a metadata word —, fp16 activations): the dot of a unit in packed fp16
    (:data:`_PTX_HDOT16`: 2.3 instructions per code instead of 4.4; the 8 products of a half lane summed in fp16, then fp32); where a row's sum comes out
    inf or NaN (an fp16 lane overflowed, or an activation is inf/NaN) the row is redone in fp32
    (:func:`_hd_row_fp32`, from plain loads), at both places a row's sum goes out: nothing in the loop body.
    Without ``ASM`` (the interpreter only: :class:`V2Call` never compiles it) the same math in plain Triton
    (:func:`_hd_meta_emu`, :func:`_hdot16_emu`).

    ``MB`` rows of x (1 … 4; ``XS``: their stride in int32 words, ``YS``: the stride of y's rows), as in
    :func:`_gemv2_kernel`: the weights loaded and dequantized once per step, the activation loads and the dot
    per row of x, one accumulator per row (a tuple, loop-carried), the sums of a finished output row stored
    for every row of x. (``HALF``: its dot dequantizes inside, so it runs per row: the codes are read once but
    dequantized ``MB`` times.)
    """
    TPG: tl.constexpr = G // UC
    SLOT: tl.constexpr = NUM_THREADS // TPG
    WPU: tl.constexpr = UC * BITS // 32
    XPU: tl.constexpr = UC // 2
    CPW: tl.constexpr = 32 // BITS
    QM: tl.constexpr = (1 << BITS) - 1
    OFFM: tl.constexpr = 0xFFFF ^ (2 * G - 1)
    STEP: tl.constexpr = SLOT * UPT
    CWG: tl.constexpr = G * BITS // 32  # code words per group
    ML: tl.constexpr = (STEP * 4 + 127) // 128  # 128-byte lines of one step's metadata
    CL: tl.constexpr = (STEP * CWG * 4 + 127) // 128  # ... and codes
    # (HALF without ASM: the interpreter's plain-Triton half dot; the launcher never compiles that)
    HD: tl.constexpr = HALF and BITS == 4 and UC == 16 and not X_BF16
    r = tl.program_id(0) * RPP
    r1 = tl.minimum(r + RPP, N)
    t = tl.arange(0, NUM_THREADS) * one
    h = t % TPG
    u = t // TPG
    xb = x8_ptr + h * (2 * UC)
    xi = x_ptr + h * XPU
    mpu = meta_ptr + u
    cpu = cw_ptr + u * CWG + h * WPU
    accs = ()  # one accumulator per row of x
    for mb in tl.static_range(MB):
        accs = accs + (tl.full([NUM_THREADS], 0.0, tl.float32),)
    # c = the current step's first group to count, re = its row's end, nre = the next row's end
    if UNI:  # every row keeps `keep` groups (GemvLayout.keep): row ends without loads
        c = r * keep
        re = c + keep
        nre = tl.minimum(r + 2, N) * keep
    else:
        c = tl.load(rp_ptr + r)
        re = tl.load(rp_ptr + r + 1)
        nre = tl.load(rp_ptr + tl.minimum(r + 2, N))
    b = tl.where(c + STEP <= re, c, tl.maximum(re - STEP, 0))
    if REG:  # the first step's loads
        metas = ()
        codes = ()
        for j in tl.static_range(UPT):
            mp = (mpu + b) + j * SLOT
            cp = (cpu + b * CWG) + j * SLOT * CWG
            if ASM:
                metas = metas + (tl.inline_asm_elementwise(LDW1, "=r,l", [mp], dtype=tl.int32, is_pure=True,
                                                           pack=1),)
                if WPU == 4:
                    w0, w1, w2, w3 = tl.inline_asm_elementwise(LDW4, "=r,=r,=r,=r,l", [cp], dtype=(tl.int32,) * 4,
                                                               is_pure=True, pack=1)
                    codes = codes + (w0, w1, w2, w3)
                elif WPU == 2:
                    w0, w1 = tl.inline_asm_elementwise(LDW2, "=r,=r,l", [cp], dtype=(tl.int32,) * 2, is_pure=True,
                                                       pack=1)
                    codes = codes + (w0, w1)
                else:
                    codes = codes + (tl.inline_asm_elementwise(LDW1, "=r,l", [cp], dtype=tl.int32, is_pure=True,
                                                               pack=1),)
            else:
                metas = metas + (tl.load(mp),)
                for i in tl.static_range(WPU):
                    codes = codes + (tl.load(cp + i),)
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): x only after the wait (xz = 0 depends on it;
        # ptxas issues the wait before the first step's weight loads all the same, so the weights of the first
        # PF steps — which the loop's prefetch, PF steps ahead, never covers — are prefetched into L2 before it:
        # prefetches are not pure, so they stay ahead of the wait)
        if PF > 0 and ASM:
            for s in tl.static_range(PF):
                prefetch_step(meta_ptr, cw_ptr, tl.minimum(b + s * STEP, MAXG - STEP), t, ML, CL, CWG, NUM_THREADS)
        xz = tl.inline_asm_elementwise(PDL_WAIT, "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.extra.cuda.gdc_launch_dependents()
        xb = xb + xz
        xi = xi + xz
    # (the row a finished sum belongs to is r − 1 wherever one goes out: a step that ends its row moves r on
    # by one. A separate loop-carried "previous row" set by `pr = r` is not carried by Triton's compiler when
    # its value at loop entry is the same object as r's: the loop body's dry run sees it unchanged.)
    pend = r < 0  # False: no row ended before the first step
    while r < r1:
        # the next step: the rest of this row, or the first step of the next row
        ends = c + STEP >= re
        nr = tl.where(ends, r + 1, r)
        nc = tl.where(ends, re, c + STEP)
        nre_ = tl.where(ends, nre, re)
        if UNI:
            nnre = tl.minimum(nr + 2, N) * keep
        else:
            nnre = tl.load(rp_ptr + tl.minimum(nr + 2, N))  # used one iteration later
        nb = tl.where(nc + STEP <= nre_, nc, tl.maximum(nre_ - STEP, 0))
        if REG:
            lb = nb
        else:
            lb = b
        lmetas = ()
        lcodes = ()
        for j in tl.static_range(UPT):
            mp = (mpu + lb) + j * SLOT
            cp = (cpu + lb * CWG) + j * SLOT * CWG
            if ASM:
                lmetas = lmetas + (tl.inline_asm_elementwise(LDW1, "=r,l", [mp], dtype=tl.int32, is_pure=True,
                                                             pack=1),)
                if WPU == 4:
                    w0, w1, w2, w3 = tl.inline_asm_elementwise(LDW4, "=r,=r,=r,=r,l", [cp], dtype=(tl.int32,) * 4,
                                                               is_pure=True, pack=1)
                    lcodes = lcodes + (w0, w1, w2, w3)
                elif WPU == 2:
                    w0, w1 = tl.inline_asm_elementwise(LDW2, "=r,=r,l", [cp], dtype=(tl.int32,) * 2,
                                                       is_pure=True, pack=1)
                    lcodes = lcodes + (w0, w1)
                else:
                    lcodes = lcodes + (tl.inline_asm_elementwise(LDW1, "=r,l", [cp], dtype=tl.int32, is_pure=True,
                                                                 pack=1),)
            else:
                lmetas = lmetas + (tl.load(mp),)
                for i in tl.static_range(WPU):
                    lcodes = lcodes + (tl.load(cp + i),)
        if not REG:
            metas = lmetas
            codes = lcodes
        if PF > 0:
            if ASM:  # the step PF steps ahead
                prefetch_step(meta_ptr, cw_ptr, tl.minimum(b + PF * STEP, MAXG - STEP), t, ML, CL, CWG, NUM_THREADS)
        # the row the previous step ended: its sum goes out here
        if pend:
            naccs = ()
            for mb in tl.static_range(MB):
                v = tl.reduce(accs[mb], 0, tl.standard._sum_combine)
                if HD:
                    v = v * 16.0
                    if not (tl.abs(v) <= FP32_MAX):  # an fp16 lane overflowed (or an activation is inf/NaN)
                        if ASM:
                            v = hd_row_fp32(x_ptr + mb * XS, cw_ptr, meta_ptr, rp_ptr, r - 1, G, UC, NUM_THREADS,
                                            one)
                        else:  # (the interpreter)
                            v = HD_ROW_EMU(x_ptr + mb * XS, cw_ptr, meta_ptr, rp_ptr, r - 1, G, UC, NUM_THREADS,
                                             one)
                if HAS_BIAS:
                    v += tl.load(bias_ptr + (r - 1)).to(tl.float32)
                tl.store((y_ptr + mb * YS) + (r - 1), v.to(y_ptr.dtype.element_ty))
                naccs = naccs + (tl.full([NUM_THREADS], 0.0, tl.float32),)
            accs = naccs
        # the current step's math (groups outside [c, re) get scale 0)
        lo = c - b - u  # the thread's group g = b + u + j·SLOT counts iff 0 ≤ g − c < re − c
        cnt = (re - c).to(tl.uint32)
        for j in tl.static_range(UPT):
            m = metas[j]
            if HD and ASM:
                negc, sc = tl.inline_asm_elementwise(META4H, "=r,=f,r", [m], dtype=(tl.int32, tl.float32),
                                                     is_pure=True, pack=1)
            elif HD:
                negc, sc = HD_META_EMU(m)
            elif ASM and BITS == 4:
                c0, c1, sc = tl.inline_asm_elementwise(META4, "=f,=f,=f,r", [m], dtype=(tl.float32,) * 3,
                                                       is_pure=True, pack=1)
            else:
                zq = (m & QM).to(tl.float32)
                sc = (m >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            xw = ()  # the unit's XPU activation words of every row of x, row after row
            for mb in tl.static_range(MB):
                for i in tl.static_range(0, XPU, 4):
                    if ASM:
                        x0, x1, x2, x3 = tl.inline_asm_elementwise(
                            LDX4, "=r,=r,=r,=r,l", [(xb + mb * (4 * XS)) + (m & OFFM) + 4 * i],
                            dtype=(tl.int32,) * 4, is_pure=True, pack=1)
                    else:
                        xp = (xi + mb * XS) + ((m & OFFM) >> 2)
                        x0 = tl.load(xp + i)
                        x1 = tl.load(xp + i + 1)
                        x2 = tl.load(xp + i + 2)
                        x3 = tl.load(xp + i + 3)
                    xw = xw + (x0, x1, x2, x3)
            rgs = ()
            for mb in tl.static_range(MB):
                if HD and ASM:
                    rgs = rgs + (tl.inline_asm_elementwise(
                        HDOT16, "=f,r,r,r,r,r,r,r,r,r,r,r",
                        [codes[j * 2], codes[j * 2 + 1], xw[mb * XPU], xw[mb * XPU + 1], xw[mb * XPU + 2],
                         xw[mb * XPU + 3], xw[mb * XPU + 4], xw[mb * XPU + 5], xw[mb * XPU + 6], xw[mb * XPU + 7],
                         negc], dtype=tl.float32, is_pure=True, pack=1),)
                elif HD:
                    rgs = rgs + (HDOT16_EMU(codes[j * 2], codes[j * 2 + 1], xw[mb * XPU], xw[mb * XPU + 1],
                                             xw[mb * XPU + 2], xw[mb * XPU + 3], xw[mb * XPU + 4], xw[mb * XPU + 5],
                                             xw[mb * XPU + 6], xw[mb * XPU + 7], negc),)
                else:
                    rgs = rgs + (tl.full([NUM_THREADS], 0.0, tl.float32),)
            for w in tl.static_range(0 if HD else WPU):
                cw = codes[j * WPU + w]
                if ASM and BITS == 4:  # the codes dequantized once, the dot per row of x
                    d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                        DEQ4B, "=f,=f,=f,=f,=f,=f,=f,=f,r,f,f", [cw, c0, c1], dtype=(tl.float32,) * 8,
                        is_pure=True, pack=1)
                    nrgs = ()
                    for mb in tl.static_range(MB):
                        nrgs = nrgs + (tl.inline_asm_elementwise(
                            DOT, "=f,r,r,r,r,f,f,f,f,f,f,f,f,f",
                            [xw[mb * XPU + 4 * w], xw[mb * XPU + 4 * w + 1], xw[mb * XPU + 4 * w + 2],
                             xw[mb * XPU + 4 * w + 3],
                             d0, d1, d2, d3, d4, d5, d6, d7, rgs[mb]],
                            dtype=tl.float32, is_pure=True, pack=1),)
                    rgs = nrgs
                else:
                    for e in tl.static_range(CPW):
                        q = ((cw >> (e * BITS)) & QM).to(tl.float32)
                        nrgs = ()
                        for mb in tl.static_range(MB):
                            xword = xw[mb * XPU + (w * CPW + e) // 2]
                            xh = (xword >> (16 * ((w * CPW + e) % 2))).to(tl.int16)
                            if X_BF16:
                                xf = xh.to(tl.bfloat16, bitcast=True).to(tl.float32)
                            else:
                                xf = xh.to(tl.float16, bitcast=True).to(tl.float32)
                            nrgs = nrgs + (rgs[mb] + xf * (q - zq),)
                        rgs = nrgs
            f = tl.where((j * SLOT - lo).to(tl.uint32) < cnt, sc, 0.0)
            naccs = ()
            for mb in tl.static_range(MB):
                naccs = naccs + (accs[mb] + rgs[mb] * f,)
            accs = naccs
        pend = ends
        if REG:
            metas, codes = lmetas, lcodes
        r, c, re, nre, b = nr, nc, nre_, nnre, nb
    # the program's last step ended its last row, r − 1 = r1 − 1
    for mb in tl.static_range(MB):
        v = tl.reduce(accs[mb], 0, tl.standard._sum_combine)
        if HD:
            v = v * 16.0
            if not (tl.abs(v) <= FP32_MAX):
                if ASM:
                    v = hd_row_fp32(x_ptr + mb * XS, cw_ptr, meta_ptr, rp_ptr, r - 1, G, UC, NUM_THREADS, one)
                else:  # (the interpreter)
                    v = HD_ROW_EMU(x_ptr + mb * XS, cw_ptr, meta_ptr, rp_ptr, r - 1, G, UC, NUM_THREADS, one)
        if HAS_BIAS:
            v += tl.load(bias_ptr + (r - 1)).to(tl.float32)
        tl.store((y_ptr + mb * YS) + (r - 1), v.to(y_ptr.dtype.element_ty))


def kernel_constexprs(G=16, BITS=4, UC=None, UPT=None, X_BF16=False, HAS_BIAS=False, ASM=True, NUM_THREADS=32,
                      REG=None, PF=None, HALF=False, PDL=False, MB=1, UNI=False, **_):
    """The constexprs of :func:`_gemv2_kernel`, or of :func:`_gemv2p_kernel` where ``REG`` / ``PF`` are given
    (``MB``: rows of x, 1 … ``MAX_MB``)."""
    duc, dupt = default_unit(G, BITS)
    d = dict(G=G, BITS=BITS, UC=UC or duc, UPT=UPT or dupt, X_BF16=X_BF16, HAS_BIAS=HAS_BIAS, ASM=ASM,
             DOT=_PTX_DOTA_BF16 if X_BF16 else _PTX_DOTA_F16,
             NUM_THREADS=NUM_THREADS)
    if REG is not None or PF is not None:
        d.update(REG=bool(REG), PF=int(PF or 0), HALF=bool(HALF))
    d["PDL"] = bool(PDL)  # (the launcher sets it: gqsa.kernels.jit.launch)
    d["MB"] = int(MB)
    d["UNI"] = bool(UNI)
    return d


def sass_signature(consts, pipe=False):
    """(argument names, types, indices marked divisible by 16) for an offline compile (gemv_sass.py);
    ``pipe``: of :func:`_gemv2p_kernel`."""
    ints = (["N", "RPP", "MAXG"] if pipe else []) + ["XS", "YS", "one", "keep"]
    args = ["x_ptr", "x8_ptr", "cw_ptr", "meta_ptr", "rp_ptr", "bias_ptr", "y_ptr"] + ints
    types = ["*i32", "*i8", "*i32", "*i32", "*i32", "*fp16", "*fp16"] + ["i32"] * (7 if pipe else 4)
    return args, types, {0, 1, 2, 3, 4, 5, 6}


# ============================================================================ launcher

_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def rows_per_program(n: int, device: torch.device, rows_per_prog: int | None = None,
                     programs_per_sm: int | None = None) -> int:
    """Rows of one program of the pipelined kernel: ``rows_per_prog`` if given, else the rows that
    spread ``n`` evenly over ``programs_per_sm`` (default ``V2P_PROGRAMS_PER_SM``) programs per SM."""
    if rows_per_prog:
        return max(1, int(rows_per_prog))
    pps = programs_per_sm or V2P_PROGRAMS_PER_SM
    return max(1, -(-n // (pps * _num_sms(device))))


def half_dot_default(packed: PackedLinear, x_dtype: torch.dtype, mrows: int, unit_codes: int | None = None,
                     num_warps: int | None = None) -> bool:
    """Whether :func:`launch` takes the packed-fp16 dot when its ``half_dot`` is None (``HALF_DOT_DEFAULT``;
    see ``HALF_MIN_CODES``): fp16 activations, 4-bit integer-zero codes in 16-code units, and, for ``"auto"``,
    one warp per program and either one row of x, G in ``HALF_GROUPS`` and ≥ ``HALF_MIN_CODES`` kept codes (kept
    groups · G), or 2 … ``HALF_WIDE_BATCH_MAX_M`` rows and G in ``HALF_WIDE_BATCH_GROUPS`` (any size)."""
    if HALF_DOT_DEFAULT == "0" or x_dtype != torch.float16 or packed.bits != 4 or packed.float_zeros:
        return False
    uc = unit_codes or V2_UNIT_CODES.get(4) or default_unit(packed.group_size, 4)[0]
    if uc != 16:
        return False
    if HALF_DOT_DEFAULT == "1":
        return True
    g = packed.group_size
    if (num_warps or V2_NUM_WARPS) != 1:
        return False
    if mrows > 1:
        return g in HALF_WIDE_BATCH_GROUPS and mrows <= HALF_WIDE_BATCH_MAX_M
    need = HALF_MIN_CODES if g == 16 else HALF_WIDE_MIN_CODES
    return g in HALF_GROUPS and packed.nnz * g >= need


def half_dot_units(packed: PackedLinear, mrows: int = 1) -> tuple[int, int | None]:
    """(units per thread, ptxas register limit or None) that the default half dot runs ``packed`` with at ``mrows``
    rows of x: for one row G16 4 and ``HALF_MAXNREG`` from ``HALF_U4_MIN_CODES`` kept codes, G32 / G64 / G128
    where the rows average ≥ ``HALF_WIDE_U4_ROW_CODES`` kept codes; else (and for several rows)
    ``HALF_UNITS_PER_THREAD`` and no limit."""
    if mrows > 1:
        return HALF_UNITS_PER_THREAD, None
    codes = packed.nnz * packed.group_size
    if packed.group_size == 16:
        u4 = codes >= HALF_U4_MIN_CODES
    else:
        u4 = codes >= HALF_WIDE_U4_ROW_CODES * max(1, packed.shape[0])
    return (4, HALF_MAXNREG) if u4 else (HALF_UNITS_PER_THREAD, None)


def launch(x2: torch.Tensor, packed: PackedLinear, layout: GemvLayout, bias: torch.Tensor | None, y: torch.Tensor,
           num_warps: int | None = None, unit_codes: int | None = None, units_per_thread: int | None = None,
           asm: bool = True, pipeline: bool | None = None, rows_per_prog: int | None = None,
           programs_per_sm: int | None = None, reg_pipeline: bool | None = None, prefetch: int | None = None,
           maxnreg: int | None = None, half_dot: bool | None = None, uniform: bool | None = None) -> None:
    """``y = x2 @ Ŵᵀ (+ bias)`` through the v2 kernel (``layout`` from :func:`build_layout` of ``packed``;
    ``x2``: ``[M, K]``, ``y``: ``[M, N]`` with unit column stride; up to ``MAX_MB`` rows of x in one launch,
    the weights read once for all of them, more in launches of ``MAX_MB``); ``asm``: the inline-PTX
    dequantization where it applies (compiled, 4 bits). ``pipeline`` (default: M > 1 rows of x, or rows
    shorter than ``LONG_ROW_GROUPS`` kept groups on average; the other arguments default to the ``V2P_*``
    settings there): the software-pipelined kernel (:func:`_gemv2p_kernel`) over ``rows_per_prog`` rows per
    program, or rows spread evenly over ``programs_per_sm`` programs per SM (:func:`rows_per_program`; the
    default up to ``V2P_MULTI_ROW_MAX_N`` rows, one row per program above), with register double-buffering
    of the next step's loads (``reg_pipeline``, default ``V2P_REG``) and/or an L2 prefetch ``prefetch`` steps
    ahead (default ``V2P_PREFETCH``; 0: none); else one program per row (:func:`_gemv2_kernel`). ``maxnreg``:
    ptxas's register limit (None: its own choice; it sinks the next step's loads below the math when it
    runs short of registers). ``half_dot``: the packed-fp16 dot of the pipelined kernel (fp16 activations,
    4-bit codes, 16-code units; elsewhere ignored; at M > 1 it dequantizes per row of x; a row whose fp16 lane
    sums overflowed is redone in fp32). None (default): :func:`half_dot_default` — then also the pipelined kernel,
    rows spread over ``V2P_PROGRAMS_PER_SM`` programs per SM, ``HALF_UNITS_PER_THREAD`` units per thread (from
    ``HALF_U4_MIN_CODES`` kept codes 4 units and ``maxnreg=HALF_MAXNREG``), each where not given. Under the
    interpreter ``half_dot=True`` runs the same math in plain Triton code (:func:`_hdot16_emu`); compiled without
    inline PTX (``asm=False``) it is ignored. ``uniform``: where every row keeps the same number of groups
    (``layout.keep``), the kernels compute the rows' ends instead of loading the row pointers (False: load them;
    None: ``gqsa.kernels.jit.UNIFORM``, i.e. unless ``GQSA_UNIFORM=0``)."""
    mrows, k = x2.shape
    if mrows > MAX_MB:
        for s in range(0, mrows, MAX_MB):
            launch(x2[s:s + MAX_MB], packed, layout, bias, y[s:s + MAX_MB], num_warps, unit_codes, units_per_thread,
                   asm, pipeline, rows_per_prog, programs_per_sm, reg_pipeline, prefetch, maxnreg, half_dot, uniform)
        return
    if mrows == 0:
        return
    if y.shape[0] != mrows or (mrows > 1 and y.stride(-1) != 1):
        raise ValueError(f"y must be [{mrows}, N] with unit column stride")
    if not V2Call.takes(packed, x2):
        x2 = V2Call.padded(packed, x2)
    call = V2Call(packed, layout, mrows, x2.dtype, bias is not None, x2.stride(0), y.stride(0), y.device, num_warps,
                  unit_codes, units_per_thread, asm, pipeline, rows_per_prog, programs_per_sm, reg_pipeline, prefetch,
                  maxnreg, half_dot, uniform)
    call(x2, bias, y)


class V2Call:
    """One v2 launch (:func:`launch`) for a layer, ``mrows`` ≤ ``MAX_MB`` rows of x in ``dtype`` with row
    stride ``stride_x``, y's row stride ``stride_y``, with or without a bias, and the launch options of
    :func:`launch` — everything but the tensors worked out once. ``call(x2, bias, y)`` launches it for an
    ``x2`` that :meth:`takes` (whole groups, unit stride, 16-byte aligned rows) and a ``y`` of ``[mrows, N]``;
    after the first launch through the compiled kernel directly (:func:`gqsa.kernels.jit.rebind`) while
    y and the bias are 16-byte aligned as then. The prepared calls of
    :class:`gqsa.kernels.dispatch.LinearPlan` keep one per batch shape."""

    @staticmethod
    def takes(packed: PackedLinear, x2: torch.Tensor) -> bool:
        """Whether the kernel can read ``x2`` as it is (else :meth:`padded`): whole groups, unit element
        stride, rows 16-byte aligned (the kernel's 16-byte activation loads)."""
        mrows, k = x2.shape
        return (packed.n_group_cols * packed.group_size == k and x2.stride(-1) == 1 and not x2.data_ptr() % 16
                and (mrows == 1 or (not x2.stride(0) % 8 and x2.stride(0) >= k)))

    @staticmethod
    def padded(packed: PackedLinear, x2: torch.Tensor) -> torch.Tensor:
        xp = torch.zeros(x2.shape[0], packed.n_group_cols * packed.group_size, dtype=x2.dtype, device=x2.device)
        xp[:, :x2.shape[1]] = x2
        return xp

    def __init__(self, packed: PackedLinear, layout: GemvLayout, mrows: int, dtype: torch.dtype, has_bias: bool,
                 stride_x: int, stride_y: int, device: torch.device, num_warps=None, unit_codes=None,
                 units_per_thread=None, asm=True, pipeline=None, rows_per_prog=None, programs_per_sm=None,
                 reg_pipeline=None, prefetch=None, maxnreg=None, half_dot=None, uniform=None):
        kp = packed.n_group_cols * packed.group_size
        self.mrows, self.kp, self.packed, self.layout = mrows, kp, packed, layout
        self.opts = dict(num_warps=num_warps, unit_codes=unit_codes, units_per_thread=units_per_thread, asm=asm,
                         pipeline=pipeline, rows_per_prog=rows_per_prog, programs_per_sm=programs_per_sm,
                         reg_pipeline=reg_pipeline, prefetch=prefetch, maxnreg=maxnreg, half_dot=half_dot,
                         uniform=uniform)
        self.xs = stride_x // 2 if mrows > 1 else 0  # int32 words between rows of x
        ys = stride_y if mrows > 1 else 0
        interp = _interpret() or device.type != "cuda"
        if half_dot is None:
            half_dot = not interp and asm and pipeline is not False and half_dot_default(packed, dtype, mrows,
                                                                                          unit_codes, num_warps)
            if half_dot:  # the settings it was measured with
                pipeline = True
                if rows_per_prog is None and programs_per_sm is None:
                    programs_per_sm = V2P_PROGRAMS_PER_SM
                upt, mx = half_dot_units(packed, mrows)
                units_per_thread = units_per_thread or upt
                maxnreg = maxnreg or mx
        self.nw = num_warps or V2_NUM_WARPS
        n = packed.shape[0]
        self.pipe = pipe = (mrows > 1 or packed.nnz < LONG_ROW_GROUPS * max(1, n)) if pipeline is None else pipeline
        if pipe and units_per_thread is None:
            units_per_thread = V2P_UNITS_PER_THREAD
        if pipe and rows_per_prog is None and programs_per_sm is None and n > V2P_MULTI_ROW_MAX_N:
            rows_per_prog = V2P_ROWS_PER_PROG
        self.consts = kernel_constexprs(
            G=packed.group_size, BITS=packed.bits, UC=unit_codes or V2_UNIT_CODES.get(packed.bits),
            UPT=units_per_thread or V2_UNITS_PER_THREAD, X_BF16=dtype == torch.bfloat16, HAS_BIAS=has_bias,
            ASM=not interp and asm, NUM_THREADS=32 * self.nw,
            REG=(V2P_REG if reg_pipeline is None else reg_pipeline) if pipe else None,
            PF=(V2P_PREFETCH if prefetch is None else prefetch) if pipe else None,
            HALF=bool(half_dot) and pipe and (interp or asm), MB=mrows,
            UNI=bool(layout.keep) and (jit.UNIFORM if uniform is None else uniform))
        keep = layout.keep if self.consts["UNI"] else 0
        self.n = n
        step = self.consts["NUM_THREADS"] // (packed.group_size // self.consts["UC"]) * self.consts["UPT"]
        if n and step > min(layout.meta.numel(), MIN_GROUPS):
            raise ValueError(f"a step of {step} groups exceeds the layout's minimum of {MIN_GROUPS}")
        self.weights = (layout.codes, layout.meta, packed.row_ptr)
        if pipe:
            rpp = rows_per_program(n, device, rows_per_prog, programs_per_sm)
            self.grid = (-(-n // rpp),)
            self.ints = (n, rpp, layout.meta.numel(), self.xs, ys, 1, keep)
            self.kern = jitted(_gemv2p_kernel, ("N", "RPP", "MAXG", "XS", "YS", "one", "keep"))
        else:
            self.grid = (n,)
            self.ints = (self.xs, ys, 1, keep)
            self.kern = jitted(_gemv2_kernel, ("XS", "YS", "one", "keep"))
        self.extra = {"maxnreg": maxnreg} if maxnreg and not interp else {}
        self._bound = None

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
        if self.n == 0:
            return
        mrows, kp = self.mrows, self.kp
        if x2.data_ptr() % 16:  # (a prepared call's x off 16-byte alignment) a padded copy, launched as built
            x2 = self.padded(self.packed, x2)
            if mrows > 1:
                return launch(x2, self.packed, self.layout, bias, y, **self.opts)
        x1 = x2.as_strided((kp,), (1,)) if mrows == 1 else x2.as_strided(((mrows - 1) * x2.stride(0) + kp,), (1,))
        args = (x1.view(torch.int32), x1.view(torch.int8), *self.weights, bias if bias is not None else y, y,
                *self.ints)
        aligned = not (y.data_ptr() | (0 if bias is None else bias.data_ptr())) & 15
        self._bound = jit.rebind(self._bound, aligned, self.kern, self.grid, args, self.consts, y.device, self.nw,
                                 pdl="gemv2p" if self.pipe else "gemv2", rows=mrows, **self.extra)
