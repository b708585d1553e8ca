"""Launcher of the block-uniform tensor-core kernel (:mod:`gqsa.kernels.block_kernels`) over a
:class:`~gqsa.kernels.block_layout.BlockLayout`, for every batch size (at M = 1 too: the tensor cores
are idle most of the time there anyway, and one kernel reads the weights the same way at every M).

The tuning knobs are a :class:`BlockConfig` argument; the table of configurations by batch size
measured on the H200 lives in :mod:`gqsa.kernels.dispatch` (``DispatchTable.block``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from .block_kernels import block_dequant_kernel, block_kernel
from .block_layout import BlockLayout
from .gemm import check_io, num_sms, workspace
from . import jit
from .jit import _interpret, aligned16, jitted, rebind

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - without triton the block kernels are never launched
    TensorDescriptor = None


def _kernel():
    return jitted(block_kernel)


def _dequant_kernel():
    return jitted(block_dequant_kernel)


@dataclass(frozen=True)
class BlockConfig:
    """Knobs of one launch. ``block_m``: tokens per tile (the MMA's N, ≥ 16); ``np``: byte tiles
    (``np · 8/bits`` kept groups) per step; ``scale_after``: scale per group after an exact integer
    dot (small M) or dequantize every weight first (large M); ``split_k`` 0 = choose from the grid
    (``waves`` programs per SM); ``wide``: each step is one dot of K = ``np · G`` per code position
    (the step's kept groups side by side, every weight scaled before the dot) instead of one dot of
    K = G per kept group — fewer, larger tensor-core steps (large M); ``pre``: a first pass dequantizes
    the layer's kept weights into a scratch tensor in the activation dtype (about half a dense copy at
    S50, written and read once per call), then the loop is a plain block-sparse GEMM, one dot of
    K = ``np · G`` per step of ``np`` slots (no dequantization in the loop: large M, where the weights
    are read by few programs and the tensor cores are the limit). ``tma`` (with ``pre``): the GEMM reads
    the scratch's ``[R, np·G]`` tiles through a tensor descriptor, one bulk copy each (Hopper's TMA; where
    the GPU has none — compute capability < 9.0 — the element loads as without it). ``num_stages`` is
    lowered where the stages would not fit the shared memory (:data:`SMEM_BUDGET`)."""

    block_m: int = 16
    np: int = 2
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0
    waves: float = 2.0
    scale_after: bool = True
    asm: bool = True  # 4-bit codes, fp16, integer zeros, compiled: inline-PTX nibble dequantization
    col_vec: bool = False  # the column as a [G, 1] tensor load (pipelined gather): measured slower, off
    wide: bool = False  # one dot of K = np·G per step (per-weight scales) instead of one of K = G per kept group
    pre: bool = False  # dequantize the kept weights first (a scratch tensor), then a GEMM without dequantization
    block_out: bool = False  # clusterR layers: y in block-row order with vector stores, then one gather into place
    tma: bool = False  # pre only: the scratch's [R, np·G] weight tiles by TMA copies (compute capability ≥ 9.0)
    pre_tiles: int = 1  # pre only: byte tiles per program of the dequantization pass (session 18: 1 of 1-8 fastest)
    pre_warps: int = 4  # pre only: warps per program of the dequantization pass

    def __post_init__(self):
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two ≥ 16, got {self.block_m}")
        if self.np < 1:
            raise ValueError(f"np must be ≥ 1, got {self.np}")
        if self.wide and (self.scale_after or self.np & (self.np - 1)):
            raise ValueError("wide needs scale_after=False and np a power of two")
        if self.pre and (self.scale_after or self.wide or self.np & (self.np - 1)):
            raise ValueError("pre needs scale_after=False, wide=False and np a power of two")
        if self.pre_tiles < 1 or self.pre_warps < 1 or self.pre_warps & (self.pre_warps - 1):
            raise ValueError(f"pre_tiles must be ≥ 1 and pre_warps a power of two, got {self.pre_tiles}, "
                             f"{self.pre_warps}")
        if self.tma and not self.pre:
            raise ValueError("tma needs pre=True (it is how the pre kernel reads its scratch)")
        if self.split_k < 0:
            raise ValueError(f"split_k must be ≥ 0, got {self.split_k}")


@functools.lru_cache(maxsize=None)
def for_group(cfg: BlockConfig, group_size: int) -> BlockConfig:
    """``cfg`` (tuned at G = 16, as the tables are) for a layer of ``group_size``: ``np`` scaled by
    16 / G, so that a step moves the same bytes and its dot the same K (the G = 16 configurations at
    G = 64 ask for more shared memory than the H200 has)."""
    if group_size <= 16:
        return cfg
    return dataclasses.replace(cfg, np=max(1, cfg.np * 16 // group_size))


def steps_of(layout: BlockLayout, cfg: BlockConfig) -> int:
    """Steps (``np`` byte tiles each; ``pre``: ``np`` slots) of the block with the most kept groups."""
    if cfg.pre:
        return max(1, math.ceil(layout.max_slots / cfg.np))
    return max(1, math.ceil(layout.max_slots * layout.bits // 8 / cfg.np))


SMEM_BUDGET = 200 * 1024  # bytes of shared memory the pipeline stages of a launch may take (H100/H200: 227 KiB)


def fit_stages(cfg: BlockConfig, rows: int, group_size: int, elem_bytes: int = 2) -> int:
    """``cfg.num_stages``, lowered (to 2 at least) until the operand tiles of a ``pre``/``wide`` step — the
    ``[R, np·G]`` weights and the ``[np·G, block_m]`` activations — fit :data:`SMEM_BUDGET` in every stage."""
    if not (cfg.pre or cfg.wide):
        return cfg.num_stages
    per_stage = (rows + cfg.block_m) * cfg.np * group_size * elem_bytes
    stages = cfg.num_stages
    while stages > 2 and stages * per_stage > SMEM_BUDGET:
        stages -= 1
    return stages


def tma_available(device: torch.device) -> bool:
    """Whether launches on ``device`` can use tensor descriptors: the interpreter (which emulates them), or a
    GPU of compute capability ≥ 9.0."""
    return _interpret() or jit.sm90(device)


def _pre_stride(layout: BlockLayout) -> int:
    """Row stride of the ``pre`` scratch: the widest block's slots, padded to 64 elements."""
    return -(-max(1, layout.max_slots) * layout.group_size // 64) * 64


class _Dequant:
    """The ``pre`` pass of one layout in one dtype (see :func:`dequantize_kept`), its launch bound after
    the first (the scratch is always freshly allocated, so its specialization never changes)."""

    def __init__(self, layout: BlockLayout, dtype: torch.dtype, zero: bool = False, tiles_per_program: int = 1,
                 num_warps: int = 4):
        r, g = layout.rows, layout.group_size
        self.layout, self.dtype, self.stride = layout, dtype, _pre_stride(layout)
        tiles = layout.max_slots * layout.bits // 8
        self.empty = tiles == 0 or layout.n_slots == 0
        if zero:  # every column up to the stride: the blocks' tails as zeros (byte tiles of G · 8/bits columns)
            tiles = max(tiles, math.ceil(self.stride / (g * 8 // layout.bits)))
        self.tpp, self.num_warps = min(tiles_per_program, tiles), num_warps
        self.grid = (layout.n_blocks, math.ceil(tiles / max(1, self.tpp)))
        self.consts = dict(R=r, G=g, BITS=layout.bits, FLOAT_Z=layout.float_zeros, FP16=dtype == torch.float16,
                           STEPS=self.tpp if _interpret() else 0, ZERO=zero)
        self.kern, self._bound = _dequant_kernel(), None

    def __call__(self) -> torch.Tensor:
        lay = self.layout
        wd = torch.empty(lay.n_blocks * lay.rows, self.stride, dtype=self.dtype, device=lay.qweight.device)
        if self.empty:
            return wd
        args = (lay.qweight, lay.sz, lay.block_ptr, wd, self.stride, self.tpp)
        self._bound = rebind(self._bound, True, self.kern, self.grid, args, self.consts, wd.device, self.num_warps, 1,
                             pdl="block")  # (wd is always new, so always aligned)
        return wd


def dequantize_kept(layout: BlockLayout, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """The ``pre`` pass: ``wd[b·R + r, j·G + t]``, the weight of row ``r``, feature ``t`` of block ``b``'s
    ``j``-th slot in ``dtype`` (the reference's rounding); columns past a block's slots are not written
    (``zero``: written as zeros). Rows are padded to a multiple of 64 elements."""
    return _Dequant(layout, dtype, zero)()


def auto_split(m: int, layout: BlockLayout, cfg: BlockConfig, sms: int) -> int:
    """Split-K factor: enough programs for ``cfg.waves`` per SM, each keeping ≥ 2 steps."""
    steps = steps_of(layout, cfg)
    if cfg.split_k:
        return max(1, min(cfg.split_k, steps))
    tiles = math.ceil(m / cfg.block_m) * layout.n_blocks
    want = math.ceil(cfg.waves * sms / tiles)
    return max(1, min(want, steps // 2 or 1))


class BlockCall:
    """The block kernel's launch for one layout, configuration and call shape — ``m`` rows of x in
    ``dtype`` with row stride ``stride_x``, y's row stride ``stride_y``, with or without a bias — with
    everything that depends only on those computed once (split-K, grid, constexprs, the ``pre`` pass).
    ``call(x2, bias, y)`` launches it (:func:`launch_block` checks the arguments; a prepared call trusts
    them). After its first launch it runs the compiled kernel directly (:func:`gqsa.kernels.jit.bind`)
    while x2, y and the bias are 16-byte aligned as they were then; the compile mode (``TRITON_INTERPRET``)
    and ``GQSA_PDL`` are read once, when it is built."""

    def __init__(self, layout: BlockLayout, cfg: BlockConfig, m: int, dtype: torch.dtype, has_bias: bool,
                 stride_x: int, stride_y: int, sms: int):
        n, k = layout.shape
        if m * max(stride_x, stride_y, n) >= 2**31:
            raise ValueError(f"M={m} rows are too many for the block kernels' 32-bit offsets: split the batch")
        interp = _interpret()
        self.layout, self.m = layout, m
        self.tma = bool(cfg.tma and cfg.pre and layout.n_slots and tma_available(layout.qweight.device))
        steps = steps_of(layout, cfg)
        split = auto_split(m, layout, cfg, sms)
        sps = math.ceil(steps / split)
        split = math.ceil(steps / sps)  # no program without steps
        tm = math.ceil(m / cfg.block_m)
        rows_ws = layout.n_blocks * layout.rows if layout.row_map is not None else n  # (kernel: ROW_MAP)
        self.ws_size = (m * rows_ws, tm * layout.n_blocks) if split > 1 else None
        self.consts = dict(R=layout.rows, G=layout.group_size, BITS=layout.bits, BLOCK_M=cfg.block_m, NP=cfg.np,
                           STEPS=sps if interp else 0, SPLIT=split > 1, HAS_BIAS=has_bias,
                           SCALE_AFTER=cfg.scale_after, DOT_F32=interp and dtype == torch.bfloat16,
                           FLOAT_Z=layout.float_zeros, FP16=dtype == torch.float16,
                           ASM=cfg.asm and not interp and layout.bits == 4 and dtype == torch.float16
                           and not layout.float_zeros, COL_VEC=cfg.col_vec, ROW_MAP=layout.row_map is not None,
                           WIDE=cfg.wide, PRE=cfg.pre, BLOCK_OUT=cfg.block_out and layout.row_map is not None,
                           UNI=bool(layout.uniform_slots) and jit.UNIFORM, TMA=self.tma)
        self.block_out = self.consts["BLOCK_OUT"]
        self.pre = (_Dequant(layout, dtype, self.tma, cfg.pre_tiles, cfg.pre_warps) if cfg.pre and layout.n_slots
                    else None)
        self.box = [layout.rows, cfg.np * layout.group_size]  # (tma: the weight tile of one step)
        stride_w = self.pre.stride if self.pre is not None else stride_y  # (unused without PRE: wd is y)
        stride_y = layout.n_blocks * layout.rows if self.block_out else stride_y
        qw, sz, cols = layout.qweight, layout.sz, layout.cols
        if layout.n_slots == 0:  # nothing kept: every load is masked, but the pointers must be real
            qw, sz, cols = (t.new_zeros(layout.rows * layout.group_size) for t in (qw, sz, cols))
        rmap = layout.row_map if layout.row_map is not None else layout.block_ptr  # (unused without ROW_MAP)
        self.weights = (qw, sz, cols, layout.block_ptr, rmap)
        # (spb: a runtime argument, not a constexpr: layers of other sparsities share one compiled kernel)
        self.ints = (m, n, k, sps, split, stride_x, stride_y, layout.n_blocks, stride_w,
                     layout.uniform_slots if self.consts["UNI"] else 0)
        self.grid = (tm, layout.n_blocks, split)
        self.launch = (cfg.num_warps, fit_stages(cfg, layout.rows, layout.group_size, dtype.itemsize))
        self.kern, self._bound = _kernel(), None

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        if self.ws_size is not None:
            ws, cnt = workspace(y.device).get(*self.ws_size)
        else:
            ws = cnt = y  # unused
        wd = self.pre() if self.pre is not None else y  # (unused without PRE)
        if self.tma:
            wd = TensorDescriptor(wd, list(wd.shape), [wd.shape[1], 1], self.box)
        # clusterR with block_out: the kernel writes y in block-row order, one gather puts the rows in place
        yk = torch.empty(self.m, lay.n_blocks * lay.rows, dtype=y.dtype, device=y.device) if self.block_out else y
        args = (x2, *self.weights, bias if bias is not None else y, yk, ws, cnt, wd, *self.ints)
        self._bound = rebind(self._bound, aligned16(x2, y, bias), self.kern, self.grid, args, self.consts, y.device,
                             *self.launch, pdl="block", rows=self.m)
        if yk is not y:
            if y.is_contiguous():
                torch.index_select(yk, 1, lay.row_pos, out=y)
            else:
                y.copy_(yk.index_select(1, lay.row_pos))
        return y


def launch_block(x2: torch.Tensor, layout: BlockLayout, bias: torch.Tensor | None, y: torch.Tensor,
                 cfg: BlockConfig, sms: int | None = None) -> torch.Tensor:
    """``y[M, N] = x2[M, K] @ Ŵᵀ (+ bias)``; ``x2`` fp16/bf16 with unit stride along K, ``y`` [M, N]
    with unit stride along N in ``x2``'s dtype (written in full), ``bias`` [N] contiguous in ``x2``'s
    dtype or None."""
    check_io(x2, layout.shape, y, bias, "the block kernels")
    m = x2.shape[0]
    if m == 0:
        return y
    call = BlockCall(layout, cfg, m, x2.dtype, bias is not None, x2.stride(0), y.stride(0), sms or num_sms(x2.device))
    return call(x2, bias, y)
