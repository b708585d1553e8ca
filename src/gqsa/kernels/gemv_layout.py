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
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..format import PackedLinear
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
    return GemvLayout(meta=meta, codes=codes, version=LAYOUT_VERSION, shape=tuple(packed.shape), nnz=nnz)


_LAYOUT_CACHE: dict = {}


def cached_layout(packed: PackedLinear) -> GemvLayout | None:
    """:func:`build_layout`, memoized on the identity (and in-place versions) of the layer's tensors.
    The memo holds the metadata stream but no view of ``qweight`` (it would keep the weights alive)."""
    q = packed.qweight
    versions = (q._version, packed.scales._version, packed.zeros._version, packed.col_idx._version)
    hit = _LAYOUT_CACHE.get(id(q))
    if hit is not None and hit[0]() is q and hit[1] == versions:
        lay = hit[2]
        if lay is None:
            return None
        if lay.nnz == packed.nnz and lay.shape == tuple(packed.shape):
            if lay.codes is None:
                return GemvLayout(meta=lay.meta, codes=q.reshape(-1).view(torch.int32), version=lay.version,
                                  shape=lay.shape, nnz=lay.nnz)
            return lay
    lay = build_layout(packed)
    memo = lay
    if lay is not None and lay.codes.data_ptr() == q.data_ptr():  # a view: rebuilt on every hit
        memo = GemvLayout(meta=lay.meta, codes=None, version=lay.version, shape=lay.shape, nnz=lay.nnz)
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

if tl is not None:  # what the kernel reads as globals must be constexpr
    LDW4, LDW2, LDW1, LDX4, META4, DEQ4B = (tl.constexpr(v) for v in (_PTX_LDW4, _PTX_LDW2, _PTX_LDW1, _PTX_LDX4,
                                                                     _PTX_META4, _PTX_DEQ4B))


def _gemv2_kernel(
    x_ptr, x8_ptr, cw_ptr, meta_ptr, rp_ptr, bias_ptr, y_ptr, one,
    G: tl.constexpr, BITS: tl.constexpr, UC: tl.constexpr, UPT: tl.constexpr, X_BF16: tl.constexpr,
    HAS_BIAS: tl.constexpr, ASM: tl.constexpr, DOT: tl.constexpr, NUM_THREADS: tl.constexpr,
):
    """y[r] = Σ over the kept groups of row r of s·Σ x·(q − z) (+ bias[r]); one program per row.

    ``x_ptr``: the activation row as int32 words (2 halves each), zero-padded to whole groups (``x8_ptr``:
    the same bytes, addressed by the inline-PTX loads); ``cw_ptr``: codes as int32 words (``G·BITS/32`` per
    group); ``meta_ptr``: one word per group (module docstring).
    """
    TPG: tl.constexpr = G // UC  # threads per group
    SLOT: tl.constexpr = NUM_THREADS // TPG  # groups per unit slot
    WPU: tl.constexpr = UC * BITS // 32  # code words per unit
    XPU: tl.constexpr = UC // 2  # activation words per unit
    CPW: tl.constexpr = 32 // BITS  # codes per code word
    QM: tl.constexpr = (1 << BITS) - 1
    OFFM: tl.constexpr = 0xFFFF ^ (2 * G - 1)  # the byte-offset bits of a metadata word
    r = tl.program_id(0)
    rs = tl.load(rp_ptr + r)
    re = tl.load(rp_ptr + r + 1)
    STEP: tl.constexpr = SLOT * UPT  # groups per step
    t = tl.arange(0, NUM_THREADS) * one
    h = t % TPG  # which unit of its group
    u = t // TPG  # the thread's group within a slot
    xb = x8_ptr + h * (2 * UC)  # the unit's activations start 2·UC·h bytes into the group's
    xi = x_ptr + h * XPU
    acc = tl.full([NUM_THREADS], 0.0, tl.float32)
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
                xw = ()
                for i in tl.static_range(0, XPU, 4):
                    if ASM:
                        x0, x1, x2, x3 = tl.inline_asm_elementwise(LDX4, "=r,=r,=r,=r,l", [xb + (m & OFFM) + 4 * i],
                                                                   dtype=(tl.int32,) * 4, is_pure=True, pack=1)
                    else:
                        xp = xi + ((m & OFFM) >> 2)  # the unit's first activation word
                        x0 = tl.load(xp + i)
                        x1 = tl.load(xp + i + 1)
                        x2 = tl.load(xp + i + 2)
                        x3 = tl.load(xp + i + 3)
                    xw = xw + (x0, x1, x2, x3)
                rg = tl.full([NUM_THREADS], 0.0, tl.float32)
                for w in tl.static_range(WPU):
                    cw = codes[j * WPU + w]
                    if ASM and BITS == 4:
                        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                            DEQ4B, "=f,=f,=f,=f,=f,=f,=f,=f,r,f,f", [cw, c0, c1], dtype=(tl.float32,) * 8,
                            is_pure=True, pack=1)
                        rg = tl.inline_asm_elementwise(
                            DOT, "=f,r,r,r,r,f,f,f,f,f,f,f,f,f",
                            [xw[4 * w], xw[4 * w + 1], xw[4 * w + 2], xw[4 * w + 3],
                             d0, d1, d2, d3, d4, d5, d6, d7, rg],
                            dtype=tl.float32, is_pure=True, pack=1)
                    else:
                        for e in tl.static_range(CPW):
                            q = ((cw >> (e * BITS)) & QM).to(tl.float32)
                            xword = xw[(w * CPW + e) // 2]
                            xh = (xword >> (16 * ((w * CPW + e) % 2))).to(tl.int16)
                            if X_BF16:
                                xf = xh.to(tl.bfloat16, bitcast=True).to(tl.float32)
                            else:
                                xf = xh.to(tl.float16, bitcast=True).to(tl.float32)
                            rg += xf * (q - zq)
                if LAST == 0:
                    acc += rg * sc
                else:  # groups outside [c, re) get scale 0: their dot is finite (real codes and activations)
                    # unless an activation is inf/NaN
                    acc += rg * tl.where((gt + j * SLOT - c).to(tl.uint32) < (re - c).to(tl.uint32), sc, 0.0)
            c = b + STEP
    v = tl.reduce(acc, 0, tl.standard._sum_combine)
    if HAS_BIAS:
        v += tl.load(bias_ptr + r).to(tl.float32)
    tl.store(y_ptr + r, v.to(y_ptr.dtype.element_ty))


def kernel_constexprs(G=16, BITS=4, UC=None, UPT=None, X_BF16=False, HAS_BIAS=False, ASM=True, NUM_THREADS=32, **_):
    duc, dupt = default_unit(G, BITS)
    return dict(G=G, BITS=BITS, UC=UC or duc, UPT=UPT or dupt, X_BF16=X_BF16, HAS_BIAS=HAS_BIAS, ASM=ASM,
                DOT=_PTX_DOTA_BF16 if X_BF16 else _PTX_DOTA_F16,
                NUM_THREADS=NUM_THREADS)


def sass_signature(consts):
    """(argument names, types, indices marked divisible by 16) for an offline compile (gemv_sass.py)."""
    args = ["x_ptr", "x8_ptr", "cw_ptr", "meta_ptr", "rp_ptr", "bias_ptr", "y_ptr", "one"]
    types = ["*i32", "*i8", "*i32", "*i32", "*i32", "*fp16", "*fp16", "i32"]
    return args, types, {0, 1, 2, 3, 4, 5, 6}


# ============================================================================ launcher

_FAST: dict = {}


def launch(x2: torch.Tensor, packed: PackedLinear, layout: GemvLayout, bias: torch.Tensor | None, y: torch.Tensor,
           num_warps: int | None = None, unit_codes: int | None = None, units_per_thread: int | None = None,
           asm: bool = True) -> None:
    """``y[0] = x2[0] @ Ŵᵀ (+ bias)`` through the v2 kernel (one row of x; ``layout`` from
    :func:`build_layout` of ``packed``); ``asm``: the inline-PTX dequantization where it applies
    (compiled, 4 bits)."""
    k = x2.shape[1]
    kp = packed.n_group_cols * packed.group_size
    if kp != k or x2.stride(-1) != 1 or x2.data_ptr() % 16:
        xp = torch.zeros(1, kp, dtype=x2.dtype, device=x2.device)
        xp[:, :k] = x2[:1]
        x2 = xp
    xi = x2.view(torch.int32)
    xb = x2.view(torch.int8)
    nw = num_warps or V2_NUM_WARPS
    interp = _interpret() or y.device.type != "cuda"
    consts = kernel_constexprs(G=packed.group_size, BITS=packed.bits, UC=unit_codes or V2_UNIT_CODES.get(packed.bits),
                               UPT=units_per_thread or V2_UNITS_PER_THREAD, X_BF16=x2.dtype == torch.bfloat16,
                               HAS_BIAS=bias is not None, ASM=not interp and asm, NUM_THREADS=32 * nw)
    n = packed.shape[0]
    step = consts["NUM_THREADS"] // (packed.group_size // consts["UC"]) * consts["UPT"]
    if step > min(layout.meta.numel(), MIN_GROUPS):
        raise ValueError(f"a step of {step} groups exceeds the layout's minimum of {MIN_GROUPS}")
    tensors = (xi, xb, layout.codes, layout.meta, packed.row_ptr, bias if bias is not None else y, y)
    kern = jitted(_gemv2_kernel, ("one",))
    if interp:
        kern[(n,)](*tensors, 1, **consts, num_warps=nw)
        return
    import triton
    import triton.knobs
    import triton.runtime.driver

    key = (tuple(consts.values()), nw, y.device.index, tuple(t.data_ptr() % 16 == 0 for t in tensors))
    ck = _FAST.get(key)
    if ck is None:
        _FAST[key] = kern[(n,)](*tensors, 1, **consts, num_warps=nw)
        return
    rt = triton.knobs.runtime
    stream = triton.runtime.driver.active.get_current_stream(y.device.index)
    args = (*tensors, 1, *consts.values())
    ck.run(n, 1, 1, stream, ck.function, ck.packed_metadata, ck.launch_metadata((n,), stream, *args),
           rt.launch_enter_hook, rt.launch_exit_hook, *args)
