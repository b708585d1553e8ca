"""Triton kernels for the parts of a decode step that are not linears (issue 12).

* :func:`rope_kv_write` — RoPE on q and k and the KV-cache write in **one** launch: q comes out rotated
  (``[B, H, T, D]``), k rotated and v as is go straight into the static cache slots (replaces the
  RoPE kernel(s) and the two ``index_copy_`` of :meth:`gqsa.engine.cache.StaticKVCache.write`).
* :func:`decode_attention` — attention of one new token (``T = 1``) over the cache, grouped-query
  aware (one program per (row, kv head) serves the ``H / Hkv`` query heads that share it), reading
  only the filled slots (``≤ slots[0]``, itself ``< kv_len``) that ``valid`` marks; flash-decoding
  style split over the slots (a second, small kernel merges the splits) when the cache is long
  enough to need more programs. Writes ``[B, 1, H·D]``, the layout ``o_proj`` reads.
* :func:`add_rms_norm` / :func:`rms_norm` — residual add + RMSNorm (transformers' ``LlamaRMSNorm``
  math: float32 statistics, normalized value cast to the activation dtype, then times the weight), one
  program per row.
* :func:`silu_mul` — ``silu(g) · u`` for ``[g | u]``.
* :func:`greedy_advance` — the greedy tail of a step: argmax of the logits, the end-of-sequence check
  and the engine's token / position / output bookkeeping in one kernel (plus one add of the counters).

Every kernel has a pure-torch twin (``*_reference``) with the same contract: it runs where Triton
cannot (CPU without ``TRITON_INTERPRET=1``) and is what the tests compare against. The engine takes
these kernels only when asked (``decode_kernels``, on by default for CUDA models); on the CPU the
engine keeps transformers' modules so that its greedy tokens equal transformers' exactly.

The interpreter/compiled choice is made when a kernel is launched (``TRITON_INTERPRET`` read then),
through :mod:`gqsa.kernels.jit`, as for every kernel of the package.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .jit import _interpret, jitted, launch

try:  # triton is optional: without it every entry point runs its twin
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

ATTN_BLOCK_N = 64  # cache slots per inner step of the attention kernel
ATTN_WARPS = 8  # (4 spills at BLOCK_N = 64, D = 128: ptxas, sm_90)
ATTN_MIN_CHUNK = 128  # slots per split at least
ATTN_SPLIT_FROM = 512  # below this many slots the attention is one kernel (no split, no merge)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available(device) -> bool:
    """Whether the Triton kernels run for tensors on ``device`` (CUDA, or CPU under the interpreter)."""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _interpret())


# reductions go through tl.reduce with the standard combine functions: a jitted tl.sum / tl.max made
# before the interpreter was switched on cannot run in it (see gqsa.kernels.block_kernels)
_SUM = tl.standard._sum_combine if HAS_TRITON else None
_MAX = tl.standard._elementwise_max if HAS_TRITON else None
_MIN = tl.standard._elementwise_min if HAS_TRITON else None


# run-time values that change between CUDA-graph buckets (cache length, splits) are not specialized on:
# one compilation per model shape, made in the eager warm-up, never inside a graph capture
_ATTN_NO_SPEC = ("kv_len", "chunk", "nsplit")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ============================================================================ kernels (plain python,
# jitted lazily by jit.jitted() for the current mode)


def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                    T, H,
                    sq_b, sq_t, sk_b, sk_t, sv_b, sv_t, sc_b, sc_t, ss_b, ss_t, sp_b, sp_t,
                    so_b, so_h, so_t, skc_b, skc_h, skc_l, svc_b, svc_h, svc_l,
                    HALF: tl.constexpr, BLOCK: tl.constexpr, TABLE: tl.constexpr, PDL: tl.constexpr):
    """Program (b·T + t, head): heads < H rotate q into qo; the others (kv head = head − H) rotate k
    and copy v into the cache at slot ``slots[t]``. cos/sin: per token ``[B, T, D]``, or (TABLE) rows
    ``positions[b, t]`` of ``[P, D]`` tables (strides ``sc_t``/``ss_t`` then step over table rows)."""
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): everything after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = pid // T
    t = pid % T
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    if TABLE:
        r = tl.load(pos_ptr + b.to(tl.int64) * sp_b + t * sp_t).to(tl.int64)
        cb = cos_ptr + r * sc_t
        sb = sin_ptr + r * ss_t
    else:
        cb = cos_ptr + b.to(tl.int64) * sc_b + t * sc_t
        sb = sin_ptr + b.to(tl.int64) * ss_b + t * ss_t
    c1 = tl.load(cb + offs, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cb + HALF + offs, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sb + offs, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sb + HALF + offs, mask=m, other=0.0).to(tl.float32)
    if head < H:
        src = q_ptr + b.to(tl.int64) * sq_b + t * sq_t + head * (2 * HALF)
        x1 = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=m, other=0.0).to(tl.float32)
        dst = qo_ptr + b.to(tl.int64) * so_b + head * so_h + t * so_t
        tl.store(dst + offs, (x1 * c1 - x2 * s1).to(qo_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + offs, (x2 * c2 + x1 * s2).to(qo_ptr.dtype.element_ty), mask=m)
    else:
        kh = head - H
        slot = tl.load(slot_ptr + t).to(tl.int64)
        src = k_ptr + b.to(tl.int64) * sk_b + t * sk_t + kh * (2 * HALF)
        x1 = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=m, other=0.0).to(tl.float32)
        dst = kc_ptr + b.to(tl.int64) * skc_b + kh * skc_h + slot * skc_l
        tl.store(dst + offs, (x1 * c1 - x2 * s1).to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + offs, (x2 * c2 + x1 * s2).to(kc_ptr.dtype.element_ty), mask=m)
        vs = v_ptr + b.to(tl.int64) * sv_b + t * sv_t + kh * (2 * HALF)
        vd = vc_ptr + b.to(tl.int64) * svc_b + kh * svc_h + slot * svc_l
        tl.store(vd + offs, tl.load(vs + offs, mask=m, other=0.0), mask=m)
        tl.store(vd + HALF + offs, tl.load(vs + HALF + offs, mask=m, other=0.0), mask=m)


def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr,
                        kn_ptr, vn_ptr, cos_ptr, sin_ptr, pos_ptr,
                        HKV, kv_len, chunk, nsplit, scale_log2,
                        sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sval_b, so_b, so_h,
                        skn_b, svn_b, sc_r, ss_r, spos_b,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                        BLOCK_N: tl.constexpr, F32DOT: tl.constexpr, ISPAN: tl.constexpr, ROPE: tl.constexpr,
                        PDL: tl.constexpr):
    """Program (b·HKV + kv head, split): online softmax of the G query heads of that kv head (padded
    to GP ≥ 16 rows of one ``tl.dot``) over the slots ``[split·chunk, (split+1)·chunk) ∩ [0, min(kv_len,
    slots[0] + 1))`` marked valid. With ``nsplit > 1`` writes its normalized partial output, max and
    sum (base-2 logits) for the merge kernel; else the final output. F32DOT: dots on float32 operands
    (float32 models, and the interpreter, whose half-precision dot is not exact). ISPAN > 0 (the
    interpreter, which cannot loop over run-time bounds): the loop runs over ``ISPAN ≥ chunk`` slots,
    masked; compiled, it runs over ``stop − start`` (a run-time bound the pipeliner can prefetch in).

    ROPE (decode, fused): q is the projection's un-rotated output (head stride ``sq_h`` = D) and is
    rotated here by row ``positions[b]`` of the cos/sin tables; the program whose split holds the
    current slot also rotates the new key (``kn``), writes it and the new value (``vn``) into the cache
    slot, then synchronizes its threads before reading the cache (RoPE + cache write + attention: one
    launch)."""
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): everything after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    slot = tl.load(slot_ptr).to(tl.int32)
    end = tl.minimum(slot + 1, kv_len)
    start = sp * chunk
    stop = tl.minimum(start + chunk, end)
    g = tl.arange(0, GP)
    d = tl.arange(0, BD)
    gm = g < G
    dm = d < D
    heads = kvh * G + g
    qp = q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :]
    if ROPE:  # x·cos + rotate_half(x)·sin in float32, rounded once (as rope_kv_write)
        dp = tl.where(d < D // 2, d + D // 2, d - D // 2)  # partner element of rotate_half
        sgn = tl.where(d < D // 2, -1.0, 1.0)
        r = tl.load(pos_ptr + b.to(tl.int64) * spos_b).to(tl.int64)
        cs = tl.load(cos_ptr + r * sc_r + d, mask=dm, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + r * ss_r + d, mask=dm, other=0.0).to(tl.float32) * sgn
        qm = gm[:, None] & dm[None, :]
        q0 = tl.load(qp, mask=qm, other=0.0)
        q1 = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + dp[None, :], mask=qm, other=0.0)
        q = (q0.to(tl.float32) * cs[None, :] + q1.to(tl.float32) * sn[None, :]).to(q0.dtype)
        if sp == slot // chunk:
            kn = kn_ptr + b.to(tl.int64) * skn_b + kvh * D
            k0 = tl.load(kn + d, mask=dm, other=0.0).to(tl.float32)
            k1 = tl.load(kn + dp, mask=dm, other=0.0).to(tl.float32)
            dst = b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h + slot.to(tl.int64) * sk_l + d
            tl.store(k_ptr + dst, (k0 * cs + k1 * sn).to(k_ptr.dtype.element_ty), mask=dm)
            vdst = b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h + slot.to(tl.int64) * sv_l + d
            tl.store(v_ptr + vdst, tl.load(vn_ptr + b.to(tl.int64) * svn_b + kvh * D + d, mask=dm, other=0.0),
                     mask=dm)
            tl.debug_barrier()  # the slot's key/value visible to every thread of this program
    else:
        q = tl.load(qp, mask=gm[:, None] & dm[None, :], other=0.0)
    if F32DOT:
        q = q.to(tl.float32)
    kb = k_ptr + b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
    vb = v_ptr + b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.full([GP], 0.0, tl.float32)
    acc = tl.full([GP, BD], 0.0, tl.float32)
    for n0 in range(0, ISPAN if ISPAN > 0 else stop - start, BLOCK_N):
        n = start + n0 + tl.arange(0, BLOCK_N)
        nm = n < stop
        ok = nm & (tl.load(valid_ptr + b.to(tl.int64) * sval_b + n, mask=nm, other=0) != 0)
        lm = nm[:, None] & dm[None, :]
        kt = tl.load(kb + n[:, None].to(tl.int64) * sk_l + d[None, :], mask=lm, other=0.0)
        vt = tl.load(vb + n[:, None].to(tl.int64) * sv_l + d[None, :], mask=lm, other=0.0)
        if F32DOT:
            s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))  # [GP, BLOCK_N], base-2 logits
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if F32DOT:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    om = gm[:, None] & dm[None, :]
    if nsplit > 1:
        row = (b * HKV * G + heads).to(tl.int64) * nsplit + sp  # partials [B·H, S(, D)]
        tl.store(po_ptr + row[:, None] * D + d[None, :], out, mask=om)
        tl.store(pm_ptr + row, m_i, mask=gm)
        tl.store(pl_ptr + row, l_i, mask=gm)
    else:
        op = o_ptr + b.to(tl.int64) * so_b + heads[:, None] * so_h + d[None, :]
        tl.store(op, out.to(o_ptr.dtype.element_ty), mask=om)


def _attn_merge_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, H, S, so_b, so_h,
                       D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr):
    """Program b·H + h: ``Σ_s w_s·o_s / Σ_s w_s`` with ``w_s = l_s·2^(m_s − max m)``."""
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): everything after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.arange(0, BS)
    d = tl.arange(0, BD)
    sm = s < S
    row = pid.to(tl.int64) * S + s
    m = tl.load(pm_ptr + row, mask=sm, other=float("-inf"))
    l_ = tl.load(pl_ptr + row, mask=sm, other=0.0)
    mx = tl.reduce(m, 0, _MAX)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(sm, l_ * tl.exp2(m - mx), 0.0)
    o = tl.load(po_ptr + row[:, None] * D + d[None, :], mask=sm[:, None] & (d < D)[None, :], other=0.0)
    tot = tl.reduce(w, 0, _SUM)
    out = tl.reduce(w[:, None] * o, 0, _SUM) / tl.where(tot > 0, tot, 1.0)
    tl.store(o_ptr + b.to(tl.int64) * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


def _add_rms_norm_kernel(x_ptr, dx_ptr, w_ptr, s_ptr, y_ptr, N, sx, sdx, ss, sy, eps,
                         HAS_ADD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program r: ``s = x + dx`` (rounded to the activation dtype, as the eager add is), then
    ``y = w · (s·rsqrt(mean(s²) + eps)).to(dtype)``."""
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): everything after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    xf = tl.load(x_ptr + r * sx + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_ADD:  # float32 sum rounded once: what the eager fp16/bf16 add computes
        xf = xf + tl.load(dx_ptr + r * sdx + offs, mask=m, other=0.0).to(tl.float32)
        xr = xf.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + r * ss + offs, xr, mask=m)
        xf = xr.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.reduce(xf * xf, 0, _SUM) / N + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (xf * inv).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + r * sy + offs, (w * y).to(y_ptr.dtype.element_ty), mask=m)


def _silu_mul_kernel(gu_ptr, o_ptr, N, sg, so, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (r, column block): ``o = silu(g) · u`` for ``gu = [g | u]`` (float32 inside)."""
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): everything after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    g = tl.load(gu_ptr + r * sg + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r * sg + N + c, mask=m, other=0.0).to(tl.float32)
    o = g / (1.0 + tl.exp(-g)) * u
    tl.store(o_ptr + r * so + c, o.to(o_ptr.dtype.element_ty), mask=m)


def _greedy_advance_kernel(lg_ptr, V, sl, done_ptr, pad_ptr, eos_ptr, out_ptr, so, tok_ptr, pos_ptr, step_ptr,
                           NEOS: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    """Program b: ``nxt = argmax(logits[b])`` (first index of the maximum), or ``pad`` if row b is done;
    ``out[b, step] = nxt``, ``done[b] |= nxt ∈ eos``, ``tok[b] = nxt``, ``pos[b] += 1``."""
    if PDL:  # programmatic dependent launch (gqsa.kernels.jit): everything after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    best_v = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_V], 2147483647, tl.int32)
    c = 0
    while c < V:
        i = c + offs
        x = tl.load(lg_ptr + b * sl + i, mask=i < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)  # noqa: PLR0124 - NaN counts as the maximum, as in torch.argmax
        upd = x > best_v  # strictly: each lane keeps its first maximum
        best_v = tl.where(upd, x, best_v)
        best_i = tl.where(upd, i, best_i)
        c += BLOCK_V
    m = tl.reduce(best_v, 0, _MAX)
    idx = tl.reduce(tl.where(best_v == m, best_i, 2147483647), 0, _MIN).to(tl.int64)
    idx = tl.where(idx == 2147483647, 0, idx)  # every logit -inf: token 0, as torch.argmax
    done = tl.load(done_ptr + b) != 0
    nxt = tl.where(done, tl.load(pad_ptr), idx)
    step = tl.load(step_ptr)
    tl.store(out_ptr + b * so + step, nxt)
    e = tl.arange(0, NEOS)
    hit = tl.reduce((tl.load(eos_ptr + e) == nxt).to(tl.int32), 0, _MAX)
    tl.store(done_ptr + b, (done | (hit != 0)).to(done_ptr.dtype.element_ty))
    tl.store(tok_ptr + b, nxt)
    tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)


# ============================================================================ twins (pure torch)


def rope_kv_write_reference(q, k, v, cos, sin, k_cache, v_cache, slots):
    """Twin of :func:`rope_kv_write` (float32 math, one rounding)."""
    bsz, t = q.shape[:2]
    d = cos.shape[-1]
    half = d // 2
    c, s = cos.float()[:, :, None], sin.float()[:, :, None]

    def rot(x):
        x = x.float().reshape(bsz, t, -1, d)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), -1)

    qo = rot(q).to(q.dtype).transpose(1, 2).contiguous()
    k_cache.index_copy_(2, slots, rot(k).to(k_cache.dtype).transpose(1, 2))
    v_cache.index_copy_(2, slots, v.reshape(bsz, t, -1, d).to(v_cache.dtype).transpose(1, 2))
    return qo


def decode_attention_reference(q, k_cache, v_cache, valid, slots, kv_len: int, scale: float):
    """Twin of :func:`decode_attention`: float32 softmax attention of ``q`` ``[B, H, 1, D]`` over the
    slots ``< min(kv_len, slots[0] + 1)`` where ``valid``; ``[B, 1, H·D]`` in q's dtype."""
    bsz, h, _, d = q.shape
    hkv = k_cache.shape[1]
    end = min(int(kv_len), int(slots[0]) + 1)
    k = k_cache[:, :, :end].float().repeat_interleave(h // hkv, dim=1)
    v = v_cache[:, :, :end].float().repeat_interleave(h // hkv, dim=1)
    s = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, 1, end]
    s = s.masked_fill(~valid[:, None, None, :end].bool(), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).to(q.dtype).reshape(bsz, 1, h * d)


def add_rms_norm_reference(x, delta, weight, eps: float):
    """Twin of :func:`add_rms_norm` (``delta=None``: no add, returns ``(x, norm(x))``)."""
    s = x if delta is None else x + delta
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return s, weight * h.to(s.dtype)


def silu_mul_reference(gate_up):
    g, u = gate_up.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(gate_up.dtype)


def greedy_advance_reference(logits, done, pad, eos, out, tok, pos, counters):
    """Twin of :func:`greedy_advance` (the engine's eager bookkeeping)."""
    nxt = torch.where(done, pad, logits.argmax(-1))
    step = counters[1:2]
    out.index_copy_(1, step, nxt[:, None])
    done |= (nxt[:, None] == eos[None, :]).any(-1)
    tok.copy_(nxt[:, None])
    pos.add_(1)
    counters.add_(1)
    return nxt


# ============================================================================ entry points


def _ok(*tensors) -> bool:
    return all(available(x.device) and x.dtype in _DTYPES for x in tensors)


def rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, positions=None):
    """Rotate q, k (``[B, T, H·D]`` / ``[B, T, Hkv·D]``, last dim contiguous, e.g. column slices of the
    fused qkv output) by ``cos``/``sin`` (transformers' rotate-half convention); write rotated k and v
    at ``slots`` ``[T]`` of ``k_cache``/``v_cache`` ``[B, Hkv, L, D]``. ``cos``/``sin``: ``[B, T, D]`` per
    token, or with ``positions`` ``[B, T]`` tables ``[P, D]`` read at those rows (no per-step cos/sin
    kernels). Returns q rotated, ``[B, H, T, D]`` contiguous. One kernel launch."""
    bsz, t = q.shape[:2]
    d = cos.shape[-1]
    h, hkv = q.shape[-1] // d, k.shape[-1] // d
    if not (_ok(q, k, v, cos, sin, k_cache) and d % 2 == 0 and all(x.stride(-1) == 1 for x in (q, k, v, cos, sin))
            and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1):
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
        return rope_kv_write_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    qo = torch.empty(bsz, h, t, d, dtype=q.dtype, device=q.device)
    table = positions is not None
    if table:
        pos = positions
        cs = (0, cos.stride(0), 0, sin.stride(0))
    else:
        cos = cos.expand(bsz, t, d) if cos.shape[0] != bsz else cos
        sin = sin.expand(bsz, t, d) if sin.shape[0] != bsz else sin
        pos = slots  # unused
        cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1))
    launch(jitted(_rope_kv_kernel), (bsz * t, h + hkv), (
        q, k, v, cos, sin, pos, qo, k_cache, v_cache, slots, t, h,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cs,
        pos.stride(0) if table else 0, pos.stride(1) if table else 0,
        qo.stride(0), qo.stride(1), qo.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        dict(HALF=d // 2, BLOCK=_pow2(d // 2), TABLE=table), q.device, 1, pdl="ops", rows=bsz * t)
    return qo


def attention_splits(batch: int, kv_heads: int, kv_len: int, sms: int | None = None) -> int:
    """Splits of the slots for the decode attention: 1 (no merge kernel) below ``ATTN_SPLIT_FROM`` slots,
    else chunks of at least ``ATTN_MIN_CHUNK`` slots and about 4 programs per SM (2 once the batch and
    kv heads alone give half an SM's worth). Set from the H200 micro-timings (benchmarks/RESULTS.md,
    issue 12): at 128 slots one kernel beats any split (the merge launch costs more than it saves);
    at 1024–4096 slots and B·Hkv ≤ 32, 8–16 splits are 2–5× faster than one."""
    if kv_len < ATTN_SPLIT_FROM:
        return 1
    if sms is None:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
            if torch.cuda.is_available() else 8
    rows = max(1, batch * kv_heads)
    by_grid = math.ceil((2 if 2 * rows >= sms else 4) * sms / rows)
    return max(1, min(kv_len // ATTN_MIN_CHUNK, by_grid))


def decode_attention(q, k_cache, v_cache, valid, slots, kv_len: int, scale: float, splits: int | None = None,
                     out=None):
    """Attention of q ``[B, H, 1, D]`` over ``k_cache``/``v_cache`` ``[B, Hkv, L, D]`` (``H`` a multiple of
    ``Hkv``): slots ``< min(kv_len, slots[0] + 1)`` where ``valid`` ``[B, L]`` is True. Returns
    ``[B, 1, H·D]``. ``splits`` (default :func:`attention_splits`) > 1 runs the split-KV kernel and the
    merge kernel."""
    bsz, h, t, d = q.shape
    hkv = k_cache.shape[1]
    if t != 1 or h % hkv or not _ok(q, k_cache, v_cache) or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 \
            or q.stride(-1) != 1 or valid.stride(-1) != 1:
        return decode_attention_reference(q, k_cache, v_cache, valid, slots, kv_len, scale)
    return _attention_launch(q.view(bsz, h, d), (q.stride(0), q.stride(1)), None, k_cache, v_cache, valid, slots,
                             kv_len, scale, splits, out)


def rope_decode_attention(q, k, v, cos, sin, positions, k_cache, v_cache, valid, slots, kv_len: int, scale: float,
                          splits: int | None = None, out=None):
    """One decode step's RoPE, KV-cache write and attention in one launch (plus the merge kernel when
    split): q, k, v ``[B, 1, H·D]`` / ``[B, 1, Hkv·D]`` un-rotated (column slices of the qkv output),
    cos/sin tables ``[P, D]`` read at ``positions`` ``[B, 1]``; k rotated and v are written at
    ``slots[0]`` of the caches, then the attention of the rotated q as :func:`decode_attention`.
    Returns ``[B, 1, H·D]``."""
    t = q.shape[1]
    d = cos.shape[-1]
    h, hkv = q.shape[-1] // d, k.shape[-1] // d
    if t != 1 or h % hkv or d % 2 or not _ok(q, k, v, cos, sin, k_cache, v_cache) \
            or any(x.stride(-1) != 1 for x in (q, k, v, cos, sin, k_cache, v_cache, valid)):
        qo = rope_kv_write(q, k, v, cos, sin, k_cache, v_cache, slots, positions=positions)
        return decode_attention(qo, k_cache, v_cache, valid, slots, kv_len, scale, splits=splits, out=out)
    rope = (k, v, cos, sin, positions)
    return _attention_launch(q, (q.stride(0), d), rope, k_cache, v_cache, valid, slots, kv_len, scale, splits, out)


def _attention_launch(q, q_strides, rope, k_cache, v_cache, valid, slots, kv_len, scale, splits, out):
    bsz, hkv, _, d = k_cache.shape
    h = q.shape[-1] // d if rope is not None else q.shape[1]
    g = h // hkv
    if splits is None:
        splits = attention_splits(bsz, hkv, kv_len) if q.is_cuda else 1
    splits = max(1, min(int(splits), kv_len))
    chunk = math.ceil(kv_len / splits)
    gp = max(16, _pow2(g))  # query heads of a group = rows of one tl.dot (at least 16)
    bd = max(16, _pow2(d))
    block_n = ATTN_BLOCK_N  # (not from kv_len: one compilation)
    o = out if out is not None else torch.empty(bsz, 1, h * d, dtype=q.dtype, device=q.device)
    o3 = o.view(bsz, h, d)
    val = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    if splits > 1:
        po = torch.empty(bsz * h, splits, d, dtype=torch.float32, device=q.device)
        pm = torch.empty(bsz * h, splits, dtype=torch.float32, device=q.device)
        pl = torch.empty(bsz * h, splits, dtype=torch.float32, device=q.device)
    else:
        po = pm = pl = o3
    if rope is not None:
        kn, vn, cos, sin, pos = rope
        rargs = (kn, vn, cos, sin, pos)
        rstrides = (kn.stride(0), vn.stride(0), cos.stride(0), sin.stride(0), pos.stride(0))
    else:
        rargs = (q, q, q, q, slots)
        rstrides = (0, 0, 0, 0, 0)
    interp = _interpret()
    launch(jitted(_decode_attn_kernel, _ATTN_NO_SPEC), (bsz * hkv, splits), (
        q, k_cache, v_cache, val, slots, o3, po, pm, pl, *rargs, hkv, kv_len, chunk, splits,
        scale * math.log2(math.e), *q_strides, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), val.stride(0), o3.stride(0), o3.stride(1),
        *rstrides), dict(G=g, GP=gp, D=d, BD=bd, BLOCK_N=block_n, F32DOT=q.dtype == torch.float32 or interp,
                         ISPAN=triton.cdiv(chunk, block_n) * block_n if interp else 0, ROPE=rope is not None),
        q.device, ATTN_WARPS, pdl="ops", rows=bsz)
    if splits > 1:
        launch(jitted(_attn_merge_kernel, ("S",)), (bsz * h,), (po, pm, pl, o3, h, splits, o3.stride(0), o3.stride(1)),
               dict(D=d, BD=bd, BS=max(16, _pow2(splits))), q.device, 4, pdl="ops", rows=bsz)
    return o


def add_rms_norm(x, delta, weight, eps: float):
    """``(x + delta, rms_norm(x + delta))`` in one kernel (``delta=None``: ``(x, rms_norm(x))``); x, delta
    ``[..., N]``, rows contiguous in the last dim."""
    n = x.shape[-1]
    ts = (x, weight) if delta is None else (x, delta, weight)
    if not _ok(*ts) or any(t.stride(-1) != 1 for t in ts) or weight.dtype != x.dtype:
        return add_rms_norm_reference(x, delta, weight, eps)
    x2 = x.reshape(-1, n)
    d2 = x2 if delta is None else delta.reshape(-1, n)
    s = x if delta is None else torch.empty_like(x)
    y = torch.empty_like(x)
    s2, y2 = s.view(-1, n), y.view(-1, n)
    if x2.shape[0]:
        launch(jitted(_add_rms_norm_kernel), (x2.shape[0],),
               (x2, d2, weight, s2, y2, n, x2.stride(0), d2.stride(0), s2.stride(0), y2.stride(0), float(eps)),
               dict(HAS_ADD=delta is not None, BLOCK=_pow2(n)), x.device, 4 if n <= 4096 else 8, pdl="ops",
               rows=x2.shape[0])
    return s, y


def rms_norm(x, weight, eps: float):
    return add_rms_norm(x, None, weight, eps)[1]


SILU_BLOCK = 1024


def silu_mul(gate_up):
    """``silu(g) · u`` for ``gate_up = [g | u]`` along the last (contiguous) dimension."""
    n = gate_up.shape[-1] // 2
    if not _ok(gate_up) or gate_up.stride(-1) != 1:
        return silu_mul_reference(gate_up)
    gu = gate_up.reshape(-1, 2 * n)
    o = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    o2 = o.view(-1, n)
    blk = min(SILU_BLOCK, _pow2(n))
    if gu.shape[0]:
        launch(jitted(_silu_mul_kernel), (gu.shape[0], triton.cdiv(n, blk)), (gu, o2, n, gu.stride(0), o2.stride(0)),
               dict(BLOCK=blk), gu.device, 4, pdl="ops", rows=gu.shape[0])
    return o


def greedy_advance(logits, done, pad, eos, out, tok, pos, counters):
    """The greedy tail of a decode step: next token ``argmax(logits)`` ``[B, V]`` (``pad`` for rows already
    ``done``), recorded at ``out[:, step]``, end-of-sequence check against ``eos`` (``-1`` = unused),
    fed back as ``tok`` ``[B, 1]`` at ``pos + 1``; ``counters`` = ``[slot, step]`` (int64) both advance by
    one. Two launches (the kernel, one add) instead of about ten."""
    bsz, v = logits.shape
    if not (_ok(logits) and logits.stride(-1) == 1 and out.stride(-1) == 1 and tok.is_contiguous()
            and pos.is_contiguous() and done.is_contiguous() and eos.is_contiguous()
            and eos.shape[0] == _pow2(eos.shape[0])):
        return greedy_advance_reference(logits, done, pad, eos, out, tok, pos, counters)
    dn = done.view(torch.uint8) if done.dtype == torch.bool else done
    launch(jitted(_greedy_advance_kernel), (bsz,), (logits, v, logits.stride(0), dn, pad, eos, out, out.stride(0), tok,
                                                   pos, counters[1:]),
           dict(NEOS=eos.shape[0], BLOCK_V=min(4096, _pow2(v))), logits.device, 8, pdl="ops", rows=bsz)
    counters.add_(1)
