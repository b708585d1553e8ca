"""Triton's compile mode for the package's kernels: the interpreter or the compiler, chosen by
``TRITON_INTERPRET`` when a kernel is launched (so tests can switch it per test), the one cache of
jitted kernels every launcher takes its kernels from, and the one launcher (:func:`launch`) with its
fast path and programmatic dependent launch. Kernels are plain Python functions until then.

**Programmatic dependent launch** (PDL, Hopper and later, :func:`pdl_enabled`): a kernel launched with
it may start while the previous kernel of the stream is still running (once that one's programs
have all started), so its launch, its prologue and its first loads of weights overlap the previous
kernel's tail. A kernel that takes ``PDL`` (a constexpr) must execute ``griddepcontrol.wait`` — which
returns once every earlier kernel of the stream has finished and its writes are visible — before it
reads anything an earlier kernel may write (activations, caches, counters, split-K workspaces) and
before it writes anything; before the wait it may only read weights and layout tensors, which no
kernel writes. It then lets the next kernel start (``griddepcontrol.launch_dependents``). Under CUDA-
graph capture the launch attribute becomes a programmatic edge of the graph. ``GQSA_PDL`` picks the
kernel families that use it (:func:`pdl_policy`; default ``decode``: by the rows of activations a launch serves,
the GEMV kernels and the decode-step ops at one row — batch-1 decoding — and the decode-step ops, block kernels and
irregular GEMM at 9-16 rows, where it measured gains; every other launch waits for the previous kernel to finish).
"""
from __future__ import annotations

import os

import torch

try:  # triton is optional: without it the launchers fall back to the reference
    import triton
    import triton.knobs
    import triton.runtime.driver
except Exception:  # pragma: no cover - depends on the environment
    triton = None

_JITTED: dict = {}
# Layers whose rows (GEMV) or blocks (block kernels, the hand-written kernel) all keep the same number of groups are
# launched with that count, and the kernels compute where a row's or block's weights start instead of loading
# row_ptr / block_ptr / qptr ahead of their first weight loads (GemvLayout.keep, BlockLayout.uniform_slots,
# MmaLayout.uniform_quads). GQSA_UNIFORM=0 makes every kernel load the pointers (for A/B timing).
UNIFORM = os.environ.get("GQSA_UNIFORM", "1").strip().lower() not in ("0", "off", "false", "no")
_FAST: dict = {}  # (kernel, constexprs, options, device, specialization) -> compiled kernel
_SM90_DEVICES: dict = {}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def jitted(fn, do_not_specialize: tuple = ()):
    """``fn`` (a plain-python kernel) jitted for the current mode (interpreter or compiled), made on
    first use and kept per (kernel, mode): every launcher of the package gets its kernels here."""
    key = (fn, _interpret())
    k = _JITTED.get(key)
    if k is None:
        k = _JITTED[key] = triton.jit(fn, do_not_specialize=list(do_not_specialize))
    return k


PDL_FAMILIES = ("ops", "gemv", "gemv2", "gemv2p", "block", "gemm")  # the kernels that can take PDL
# The default, "decode": by the rows of activations a launch serves (PDL_DECODE: first and last row count, the
# families). Measured on the H200 (benchmarks/RESULTS.md, "Session 15"), 7B synthetic, decode tokens/s: at batch 1 the
# pipelined GEMV and the decode-step ops together +2.2 % (W4 S50 G16 600.5 → 613.7), while either alone made the
# step slower (gemv2p 579.9, ops 574.3); at batch 16 the ops, block kernels and irregular GEMM +2.4 % (block64
# 5774 → 5914), +1.35 % (cluster64 4592 → 4654), +0.5 % (row masks 3794 → 3813). Not at 2-8 rows, where block
# layers run the hand-written kernel, which has no PDL, and the ops alone lost (block64 at batch 4 −4 % with every
# family on), nor above 16 (session 4: block kernels at batch 64 −5.5 %). 9-15 rows run the kernels measured at 16.
# At one row the other GEMV kernels (the one-program-per-row v2 kernel of long bf16 rows, v1 of 8-bit layers) take
# it too, so that no decode-step op with PDL neighbours a GEMV without (not measured: no such layer in the 7B fp16
# benchmark, where every GEMV is the pipelined one).
PDL_DEFAULT = "decode"
PDL_DECODE = ((1, 1, frozenset(("gemv", "gemv2", "gemv2p", "ops"))), (9, 16, frozenset(("ops", "block", "gemm"))))
_PDL_SETS: dict = {}


def pdl_setting() -> str:
    """The programmatic-dependent-launch setting in force: ``GQSA_PDL`` or :data:`PDL_DEFAULT`."""
    return os.environ.get("GQSA_PDL", PDL_DEFAULT)


def pdl_policy() -> tuple[frozenset, tuple | None]:
    """(the kernel families that may be launched with PDL, the rows rule or None for every launch of them):
    ``GQSA_PDL`` — ``decode`` (:data:`PDL_DECODE`: ``(first, last rows, families)`` ranges), ``0``/``none``,
    ``all``, or a comma list of :data:`PDL_FAMILIES` (decode-step ops, GEMV v1, GEMV v2 one row a program, GEMV
    v2 pipelined, block kernels, irregular GEMM) — else :data:`PDL_DEFAULT`."""
    env = pdl_setting().strip().lower()
    pol = _PDL_SETS.get(env)
    if pol is None:
        if env in ("0", "none", "off", ""):
            pol = (frozenset(), None)
        elif env == "decode":
            pol = (frozenset().union(*(f for _, _, f in PDL_DECODE)), PDL_DECODE)
        elif env in ("1", "all", "on"):
            pol = (frozenset(PDL_FAMILIES), None)
        else:
            fam = frozenset(f.strip() for f in env.split(","))
            bad = sorted(fam - set(PDL_FAMILIES))
            if bad:
                raise ValueError(f"GQSA_PDL: unknown kernel families {bad}; use decode, 0, all or a comma list of "
                                 f"{', '.join(PDL_FAMILIES)}")
            pol = (fam, None)
        _PDL_SETS[env] = pol
    return pol


def pdl_enabled(device, family: str | None = None, rows: int | None = None) -> bool:
    """Whether kernels of ``family`` (any, when None) launched on ``device`` over ``rows`` rows of activations
    use programmatic dependent launch: compiled kernels on a GPU of compute capability ≥ 9.0, for the families
    of :func:`pdl_policy` (under ``decode`` by ``rows``; a launch that does not say its rows: none)."""
    fam, by_rows = pdl_policy()
    if not fam or (family is not None and family not in fam):
        return False
    if by_rows is not None and (rows is None or not any(lo <= rows <= hi and (family is None or family in f)
                                                        for lo, hi, f in by_rows)):
        return False
    return not _interpret() and sm90(device)


def sm90(device) -> bool:
    """Whether ``device`` is a GPU of compute capability ≥ 9.0 (Hopper and later: programmatic dependent launch,
    TMA), cached per device."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _SM90_DEVICES.get(idx)
    if ok is None:
        ok = _SM90_DEVICES[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return ok


def _spec(a):
    t = type(a)
    if t is int:
        return a & 15 == 0, a == 1, -2**31 <= a < 2**31
    if isinstance(a, torch.Tensor):
        return a.data_ptr() & 15 == 0, a.dtype
    if t is not bool and isinstance(a, int):
        return a % 16 == 0, a == 1, -2**31 <= a < 2**31
    return t


def spec_bits(args) -> tuple:
    """What Triton specializes a launch on: pointers' dtype and 16-byte alignment; ints % 16 == 0, == 1 and
    their width (32 or 64 bits); the type of anything else."""
    return tuple(map(_spec, args))


class Bound:
    """A compiled kernel bound to its grid, constexprs and device (:func:`bind`): ``bound(*args)`` launches
    it on the current stream with new positional ``args`` **of the specialization it was compiled for** —
    the same dtypes and int properties, and every pointer 16-byte aligned where the first one was. Nothing
    is checked: the caller keeps that promise (the prepared calls of :mod:`gqsa.kernels.dispatch` key
    them by batch size, strides and dtype and check the alignment of the pointers that change)."""

    __slots__ = ("ck", "grid", "tail", "index")

    def __init__(self, ck, grid: tuple, consts: tuple, index: int):
        self.ck, self.grid, self.tail, self.index = ck, grid, consts, index

    def __call__(self, *args) -> None:
        _run(self.ck, self.grid, self.index, (*args, *self.tail))


def _run(ck, grid, index, full) -> None:
    """Run the compiled kernel ``ck`` (what Triton's launch does once it has found it)."""
    rt = triton.knobs.runtime
    stream = triton.runtime.driver.active.get_current_stream(index)
    ck.run(grid[0], grid[1], grid[2], stream, ck.function, ck.packed_metadata, ck.launch_metadata(grid, stream, *full),
           rt.launch_enter_hook, rt.launch_exit_hook, *full)


def launch(kern, grid, args: tuple, consts: dict, device, num_warps: int, num_stages: int | None = None,
           pdl: str | None = None, rows: int | None = None, **options) -> None:
    """Launch ``kern`` (a :func:`jitted` kernel) on ``grid`` (1–3 ints) with positional ``args`` and
    constexprs ``consts``. After the first launch of a specialization the compiled kernel is called
    directly (Triton's Python launch path costs tens of µs a call; this one, ``benchmarks/launch_overhead.py``,
    is what bounds an eager prefill). ``pdl``: None for a kernel without a ``PDL`` constexpr; else the
    kernel's family (:data:`PDL_FAMILIES`): the kernel gets ``PDL = pdl_enabled(device, pdl, rows)`` (``rows``:
    the rows of activations the launch serves) and is launched with the programmatic-dependent-launch attribute
    when that is true. ``options``: other compile options of the compiled path (``maxnreg``)."""
    _launch(kern, grid, args, consts, device, num_warps, num_stages, pdl, rows, options, False)


def bind(kern, grid, args: tuple, consts: dict, device, num_warps: int, num_stages: int | None = None,
         pdl: str | None = None, rows: int | None = None, **options) -> Bound | None:
    """:func:`launch`, then the compiled kernel as a :class:`Bound` for later launches of the same
    specialization on the same grid (the constexprs, ``GQSA_PDL`` and the compile mode as they were now);
    None where there is none (the interpreter, a CPU device)."""
    return _launch(kern, grid, args, consts, device, num_warps, num_stages, pdl, rows, options, True)


def rebind(bound: Bound | None, aligned: bool, kern, grid, args: tuple, consts: dict, device, num_warps: int,
           num_stages: int | None = None, pdl: str | None = None, rows: int | None = None,
           **options) -> Bound | None:
    """One launch of a prepared call site: through ``bound`` when there is one and the call's changing
    pointers are 16-byte ``aligned`` (as they were when it was bound), else through :func:`bind`. Returns
    the :class:`Bound` to keep: the new one when ``aligned``, else ``bound``."""
    if bound is not None and aligned:
        bound(*args)
        return bound
    new = bind(kern, grid, args, consts, device, num_warps, num_stages, pdl, rows, **options)
    return new if aligned else bound


def aligned16(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``x``, ``y`` and ``bias`` (if any) start on 16-byte boundaries."""
    return not (x.data_ptr() | y.data_ptr() | (0 if bias is None else bias.data_ptr())) & 15


def _launch(kern, grid, args, consts, device, num_warps, num_stages, pdl, rows, options, want_bound):
    if type(device) is not torch.device:
        device = torch.device(device)
    if len(grid) < 3:
        grid = (*grid, *(1,) * (3 - len(grid)))
    if pdl is not None:
        on = pdl_enabled(device, pdl, rows)
        consts = {**consts, "PDL": on}
        if on:
            options = {**options, "launch_pdl": True}
    if device.type != "cuda" or _interpret():
        opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        kern[grid](*args, **consts, **opts)
        return None
    key = (id(kern), tuple(consts.values()), num_warps, num_stages, device.index, tuple(map(_spec, args)),
           tuple(options.items()))
    ck = _FAST.get(key)
    if ck is None:
        opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        ck = _FAST[key] = kern[grid](*args, **consts, **opts, **options)
        return Bound(ck, grid, tuple(consts.values()), device.index) if want_bound else None
    _run(ck, grid, device.index, (*args, *consts.values()))
    return Bound(ck, grid, tuple(consts.values()), device.index) if want_bound else None
