"""Launcher of the hand-written tensor-core kernel for block-uniform 4-bit layers (``mma_block.cu``, over an
:class:`~gqsa.kernels.mma_layout.MmaLayout`), for small batches (M ≤ ``MAX_M``).

The CUDA source is compiled at first use by NVRTC through PyTorch (``torch.cuda._compile_kernel``; no
compiler or extra package is needed beyond a CUDA build of PyTorch), one specialization per (n-tiles of 8
tokens, warps, m-tiles per warp, steps per kept group, edge). :func:`available` says whether it can run here;
where it cannot (no CUDA, an older GPU, a PyTorch without NVRTC, ``GQSA_MMA=0``) the dispatch keeps the Triton
block kernel.
The kernel is CUDA-graph capturable after one call of the same shape (the split-K workspace).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from importlib import resources

import torch

from . import jit
from .gemm import check_io, num_sms, workspace
from .mma_layout import STEP, MmaLayout

MAX_M = 64  # largest batch the kernel takes (8 n-tiles of 8 tokens)
_KERNEL = "gqsa_mma_block"


def _source() -> str:
    return resources.files("gqsa.kernels").joinpath("mma_block.cu").read_text()


def may_run(device) -> bool:
    """Whether the hand-written kernel may run on ``device``, without compiling anything: CUDA, compute
    capability ≥ 8.0 (mma.sync m16n8k16), PyTorch's NVRTC helper present, not switched off by ``GQSA_MMA=0``."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("GQSA_MMA", "1").strip() in ("0", "off", "false", "no"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0) and hasattr(torch.cuda, "_compile_kernel")


def available(device) -> bool:
    """:func:`may_run`, and a first compilation on the device that worked (once per device; a failure is
    reported once, as a warning, and the Triton kernel serves). The dispatch asks this at a layer's first call
    in the kernel's range, not when it builds the layer's plan (loading a model compiles nothing)."""
    if not may_run(device):
        return False
    device = torch.device(device)
    return _compiles(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _compiles(index: int) -> bool:
    try:
        _kernel(1, 4, 1, 1, False, index)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use the Triton kernel
        warnings.warn(f"gqsa: the hand-written tensor-core kernel did not compile ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); the Triton kernels serve instead", stacklevel=2)
        return False


@functools.lru_cache(maxsize=None)
def _kernel(nt: int, warps: int, m_tiles: int, sub: int, edge: bool, index: int):
    """One specialization, compiled and loaded for GPU ``index`` (a loaded kernel belongs to one device)."""
    name = f"{_KERNEL}<{nt}, {warps}, {m_tiles}, {sub}, {'true' if edge else 'false'}>"
    with torch.cuda.device(index):
        return torch.cuda._compile_kernel(_source(), name, nvcc_options=["-std=c++17"])


@dataclass(frozen=True)
class MmaConfig:
    """Knobs of one launch: ``split_k`` 0 = enough CTAs for ``waves`` per SM (each keeping ≥ ``min_quads``
    quads of 4 steps); ``m_tiles``: 16-row m-tiles per warp (1, 2, 4 or 8; at most the block's), so a CTA has
    rows / 16 / m_tiles warps and each warp reuses its activation fragments for that many m-tiles (slower than 1 at
    every M = 16-64 measured: fewer warps per SM, each issuing all the CTA's copies; benchmarks/RESULTS.md "Session
    13")."""

    split_k: int = 0
    waves: float = 8.0  # measured best of 4, 8 (q2/q16), 16 at M = 2-8 (benchmarks/RESULTS.md "Session 10")
    min_quads: int = 2
    m_tiles: int = 1

    def __post_init__(self):
        if self.split_k < 0 or self.waves <= 0 or self.min_quads < 1 or self.m_tiles not in (1, 2, 4, 8):
            raise ValueError(f"bad MmaConfig {self}")


def auto_split(layout: MmaLayout, cfg: MmaConfig, sms: int) -> int:
    if cfg.split_k:
        return max(1, min(cfg.split_k, layout.max_quads or 1))
    want = math.ceil(cfg.waves * sms / max(1, layout.n_blocks))
    return max(1, min(want, (layout.max_quads // cfg.min_quads) or 1))


class MmaCall:
    """The kernel's launch for one layout, configuration and call shape (``m`` rows of fp16 x, bias or
    none), everything fixed once; ``call(x2, bias, y)`` launches it. Arguments are trusted (the dispatch checks
    them: fp16, unit inner strides); an x whose rows are not 16-byte aligned (the kernel copies 16 bytes at a time)
    is copied first."""

    def __init__(self, layout: MmaLayout, cfg: MmaConfig, m: int, has_bias: bool, stride_x: int, stride_y: int,
                 sms: int | None = None):
        # (x's row stride is read at every call: a misaligned x is copied, see __call__)
        n, k = layout.shape
        if not 1 <= m <= MAX_M:
            raise ValueError(f"the hand-written kernel takes 1 to {MAX_M} rows of x, got {m}")
        if m * max(stride_x, stride_y, layout.n_blocks * layout.rows) >= 2**31:
            raise ValueError(f"M={m} rows are too many for the kernel's 32-bit offsets")
        self.layout, self.m = layout, m
        dev = layout.qw.device
        nt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
        split = auto_split(layout, cfg, sms or num_sms(dev))
        qps = max(1, math.ceil(layout.max_quads / split)) if layout.max_quads else 1
        split = max(1, math.ceil(layout.max_quads / qps)) if layout.max_quads else 1
        self.split, self.qps = split, qps
        self.index = dev.index if dev.index is not None else torch.cuda.current_device()
        mt = min(cfg.m_tiles, layout.rows // 16)
        warps = layout.rows // 16 // mt
        self.kern = _kernel(nt, warps, mt, layout.group_size // STEP, layout.edge, self.index)
        self.grid = (layout.n_blocks, split, 1)
        self.block = (32 * warps, 1, 1)
        self.ld_ws = layout.n_blocks * layout.rows
        self.ws_size = (m * self.ld_ws, layout.n_blocks) if split > 1 else None
        rmap = layout.row_map if layout.row_map is not None else layout.qptr  # (unused without a map)
        qw, kofs, sz = layout.qw, layout.kofs, layout.sz
        if layout.n_quads == 0:  # nothing kept: the loop never runs, but the pointers must be real
            qw = kofs = sz = layout.qptr
        self.weights = (qw, kofs, sz, layout.qptr, rmap)
        uq = layout.uniform_quads if jit.UNIFORM else 0  # (0: the kernel loads qptr)
        self.ints = (qps, split, int(has_bias), int(layout.row_map is not None), self.ld_ws, uq)

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if x2.data_ptr() % 16 or x2.stride(0) % 8:  # x is copied 16 bytes at a time: an aligned copy
            x2 = x2.clone(memory_format=torch.contiguous_format)
        if self.ws_size is not None:
            ws, cnt = workspace(y.device).get(*self.ws_size)
        else:
            ws = cnt = y  # unused
        n, k = self.layout.shape
        args = [x2, *self.weights, bias if bias is not None else y, y, ws, cnt, self.m, n, k, x2.stride(0),
                y.stride(0), *self.ints]
        if torch.cuda.current_device() == self.index:
            self.kern(grid=self.grid, block=self.block, args=args)
        else:  # a model on another GPU than the current one: launch in its context, on its stream
            with torch.cuda.device(self.index):
                self.kern(grid=self.grid, block=self.block, args=args)
        return y


def launch_mma(x2: torch.Tensor, layout: MmaLayout, bias: torch.Tensor | None, y: torch.Tensor,
               cfg: MmaConfig = MmaConfig(), sms: int | None = None) -> torch.Tensor:
    """``y[M, N] = x2[M, K] @ Ŵᵀ (+ bias)`` with the hand-written kernel: the arguments of the other launchers
    (:func:`gqsa.kernels.gemm.check_io`), in float16, 1 to ``MAX_M`` rows."""
    check_io(x2, layout.shape, y, bias, "the hand-written tensor-core kernel")
    if x2.dtype != torch.float16:
        raise ValueError(f"the hand-written tensor-core kernel reads float16 activations, got {x2.dtype}")
    call = MmaCall(layout, cfg, x2.shape[0], bias is not None, x2.stride(0), y.stride(0), sms)
    return call(x2, bias, y)


__all__ = ["MAX_M", "MmaCall", "MmaConfig", "available", "launch_mma", "may_run"]
