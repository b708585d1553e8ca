"""Batch-size dispatch of a packed GQSA layer: one :class:`LinearPlan` per layer, built once.

* ``M ≤ table.gemv_max_m`` rows of x: the decode GEMV (:mod:`gqsa.kernels.gemv`, canonical layout);
* above: the tensor-core GEMM (:mod:`gqsa.kernels.gemm`) on the load-time
  :class:`~gqsa.kernels.layout.TileLayout`, with the :class:`~gqsa.kernels.gemm.GemmConfig` of the
  first bucket of ``table.buckets`` whose ``max_m`` holds M (split-K chosen from the grid size);
* ``M ≥ table.expand_min_m`` (when set): the per-call dense expansion + cuBLAS of
  :func:`gqsa.kernels.gemv.gqsa_linear` (``variant="dense"``). It is in the H200 table *only* because
  the tensor-core kernel measured slower than it from M = 256 (1.37× at 256 summed over three shapes, second
  revision, benchmarks/RESULTS.md "Session 6"); set ``expand_min_m=None`` in a table to run the GEMM there too.
* block-uniform 4-bit layers (below) take the hand-written CUDA kernel of :mod:`gqsa.kernels.mma_gemm` at small M
  (``BlockTable.mma_max_m``) where it compiles, else the Triton block kernel;
* 3-bit layers (no kernel reads 3-bit codes) are planned with their codes widened to 4 bits
  (:func:`gqsa.kernels.gemv.kernel_packed`: the same weights, 4/3 of the code bytes on the device).
* ``dense_min_m`` (off by default) is the explicit opt-in of a *cached* dense fp16/bf16 copy of the
  weight, used with cuBLAS from that many rows on (memory-rich prefill).

**Block-uniform layers** (``--allocation blockR``: every R-row block keeps the same group columns,
detected at load time by :func:`~gqsa.kernels.block_layout.detect_block_rows`; ``clusterR``: any R rows
share their columns, :func:`~gqsa.kernels.block_layout.detect_row_clusters`, through a row map) take their own column
of the table, ``table.block`` (:class:`BlockTable`): the GEMV up to ``block.gemv_max_m`` rows, the
block tensor-core kernel (:mod:`gqsa.kernels.block_gemm`, on a
:class:`~gqsa.kernels.block_layout.BlockLayout` built instead of the TileLayout) above, and the dense
expansion from ``block.expand_min_m`` of their height on (from ``block.dense_expand_min_m`` for layers that keep
nearly every group, such as sparsity 0; from ``block.group_expand_min_m`` for layers of wide groups, G ≥ 64, whose
``pre`` kernels ran at 0.3–0.7× cuBLAS's speed there). Other layers keep the table above.

**Prepared calls.** The first call of a batch shape (x's shape, strides and dtype, bias or none) on the
v2 GEMV, the block kernel, the irregular GEMM or the dense expansion keeps its launch
(:class:`~gqsa.kernels.gemv_layout.V2Call`, :class:`~gqsa.kernels.block_gemm.BlockCall`,
:class:`~gqsa.kernels.gemm.GemmCall`, :class:`~gqsa.kernels.gemv.DenseCall`): grid, split-K and
constexprs worked out once and, after the first launch, the compiled kernel called directly — what an eager
call costs on the CPU is what bounds an eager prefill and eager decoding outside the engine's CUDA graphs
(``benchmarks/launch_overhead.py``, ``benchmarks/eager_ab.py``). The compile mode and ``GQSA_PDL`` are
read when a call is prepared.

Every path is CUDA-graph capturable after one call at the same batch size (compilation, workspace).
The crossover table :data:`H200_TABLE` was measured with ``benchmarks/gemm.py --sweep`` (see
benchmarks/RESULTS.md); other GPUs use it too until measured.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..format import PackedLinear
from . import gemv
from .block_gemm import BlockCall, BlockConfig, for_group
from .block_layout import BLOCK_ROWS, build_block_layout, detect_block_rows, detect_row_clusters
from .gemm import GemmCall, GemmConfig, num_sms
from .layout import build_tile_layout
from .mma_gemm import MmaCall, MmaConfig
from .mma_gemm import available as mma_available, may_run as mma_may_run
from .mma_layout import build_mma_layout, unsupported as mma_unsupported


@dataclass(frozen=True)
class BlockTable:
    """Configurations of the block-uniform kernels (:mod:`gqsa.kernels.block_gemm`).

    ``buckets``: ``((rows, ((max_m, BlockConfig), ...)), ...)`` — per block height R (ascending), the
    buckets in ascending ``max_m``, the last serving every larger M; a layer with a height not in the
    table takes the largest one below it. ``expand_min_m``: ``((rows, m), ...)``, from ``m`` rows on
    the per-call dense expansion + cuBLAS (absent: never). ``max_rows``: the layout is built with at
    most this many rows per block (a block128 layer can run as block64). ``gemv_max_m``: up to this
    many rows, the decode GEMV of :mod:`gqsa.kernels.gemv` (canonical layout) instead. ``tile_min_m``:
    ``((rows, m), ...)``, from ``m`` rows on (until the expansion) the irregular tensor-core GEMM of
    :mod:`gqsa.kernels.gemm` instead (its TileLayout is built on the first such call). ``dense_expand_min_m``: for
    block layers that keep at least ``DENSE_KEEP`` of their groups (e.g. sparsity 0, where every layer is
    block-uniform), the expansion from this M on whatever their height (None: the height's value), and the GEMV up
    to ``dense_gemv_max_m`` rows (0: ``gemv_max_m``). ``mma_max_m``: ``((rows, m), ...)``, above the GEMV and up to
    ``m`` rows the hand-written tensor-core kernel (:mod:`gqsa.kernels.mma_gemm`) for the layers and calls it takes
    (4-bit codes, integer zero points, fp16 activations, a GPU where it compiles; heights below the smallest listed:
    never); the Triton block kernel otherwise. ``group_expand_min_m``: ``((G, m), ...)``, layers whose groups are at
    least ``G`` columns wide take the expansion from ``m`` rows on whatever their height (the smaller of this and
    the height's value; group sizes below the smallest listed: the height's value)."""

    buckets: tuple = field(default_factory=tuple)
    expand_min_m: tuple = field(default_factory=tuple)
    max_rows: int = 128
    gemv_max_m: int = 0  # up to this many rows the canonical-layout GEMV serves block layers too
    tile_min_m: tuple = field(default_factory=tuple)  # ((rows, m), ...): the irregular GEMM from m rows on
    dense_expand_min_m: int | None = None  # layers keeping ≥ DENSE_KEEP of their groups: the expansion from here
    dense_gemv_max_m: int = 0  # ... and the GEMV up to here (0: gemv_max_m)
    mma_max_m: tuple = field(default_factory=tuple)  # ((rows, m), ...): the hand-written kernel up to m rows
    group_expand_min_m: tuple = field(default_factory=tuple)  # ((G, m), ...): groups ≥ G wide: the expansion from m

    @staticmethod
    def _for(pairs, rows, below_all=True):
        """The value of the largest height ≤ rows (``below_all``: the smallest height's when none is)."""
        best = None
        for r, v in pairs:
            if r <= rows:
                best = v
        return best if best is not None or not below_all else (pairs[0][1] if pairs else None)

    def config(self, rows: int, m: int) -> BlockConfig:
        buckets = self._for(self.buckets, rows)
        for max_m, cfg in buckets:
            if m <= max_m:
                return cfg
        return buckets[-1][1]

    def expand_from(self, rows: int) -> int | None:
        return self._for(self.expand_min_m, rows, below_all=False)

    def tile_from(self, rows: int) -> int | None:
        return self._for(self.tile_min_m, rows, below_all=False)

    def mma_upto(self, rows: int) -> int:
        return self._for(self.mma_max_m, rows, below_all=False) or 0

    def expand_for(self, rows: int, group_size: int, dense: bool = False) -> int | None:
        """From how many rows a layer of this height and group size takes the dense expansion (None: never);
        ``dense``: it keeps at least ``DENSE_KEEP`` of its groups."""
        cands = [self.expand_from(rows), self._for(self.group_expand_min_m, group_size, below_all=False)]
        if dense:
            cands.append(self.dense_expand_min_m)
        cands = [c for c in cands if c is not None]
        return min(cands) if cands else None


DENSE_KEEP = 0.9  # a block layer keeping this share of its groups or more takes BlockTable.dense_expand_min_m


@dataclass(frozen=True)
class DispatchTable:
    """``gemv_max_m``: largest batch served by the GEMV; ``buckets``: ``(max_m, GemmConfig)`` in
    ascending ``max_m``, the last one serving every larger M; ``expand_min_m``: from this many rows on,
    per-call dense expansion + cuBLAS (None: never)."""

    gemv_max_m: int
    buckets: tuple = field(default_factory=tuple)
    expand_min_m: int | None = None
    block: BlockTable | None = None  # block-uniform layers (None: they take the irregular path)

    def config(self, m: int) -> GemmConfig:
        for max_m, cfg in self.buckets:
            if m <= max_m:
                return cfg
        return self.buckets[-1][1]


_B = BlockConfig
_W = functools.partial(BlockConfig, scale_after=False, wide=True)
_P = functools.partial(BlockConfig, scale_after=False, pre=True)
# Measured on the H200 (benchmarks/gemm.py --block-sweep, benchmarks/RESULTS.md). Block16: the sweep of
# 2026-12-01 (first block-kernel session): per bucket the candidate with the least total time over
# 4096×4096, 11008×4096 and 28672×8192 (W4 S50 G16); gemv_max_m = 1 (the block kernel beat the GEMV at
# M = 2 summed over those shapes), the irregular GEMM from M = 17 (it beat block16 at M = 32 and 64).
# Block64/128: the sweeps of the second session (2026-12-01, with the `wide` kernel: one dot of
# K = np·G per step), per bucket the candidate with the smallest geometric mean over the three shapes
# of (its time / the shape's best time) — a sum of times would let the 70B layer alone decide; at
# M ≤ 16 for block64 that choice (4 warps) is 1.31× slower than the 1-warp configuration on 28672×8192
# and 1.3× faster on 4096×4096. The narrow kernel (one dot per kept group) stays where it won: block64
# at M = 65–256 and above.
# Third session (2026-12-01): the ``pre`` kernels (a dequantization pass, then a block-sparse GEMM without
# dequantization in the loop) for block128 from M = 65 and for block64 from M = 257; at M = 2048
# block128 pre ran at 1.06–1.10× cuBLAS on the three shapes (wide 0.68–0.85×, the expansion 0.83–0.90×),
# block64 pre at 0.85–0.90× (the expansion 0.72–0.89×); at M = 256 block128 pre beat wide on all three.
# So no dense expansion for block64/128 (benchmarks/RESULTS.md, "pre").
# Fourth session: ``block_out`` (clusterR layers: y in block-row order, then a gather) for block128 at
# M = 17–64 only, where it won on all three shapes at M = 64 (22.7 / 38.1 / 112.7 µs against 24.0 / 46.4 /
# 119.8 through the map); at M = 4 the gather's extra launch lost 5 µs on every shape. Not measured above 64.
# Sixth session: M = 17–32 buckets for block64/128 (benchmarks/gemm.py --block-sweep --sweep-batches 24,32, the
# fewer warps of the M ≤ 16 buckets and block_m = 32): at M = 32 summed over the three shapes block128 80.9 µs
# against 138.5 for the 17–64 bucket (block_m = 64, 8 warps; 28672×8192: 53.3 against 96.0), block64 89.0 against
# 130.8; at M = 24 79.0 / 85.6 against 136.9 / 124.4. And M = 33–64 (--sweep-batches 48,64, same candidates):
# block128 1–2 warps, np = 2: 126.5 against 149.8 µs at M = 64 (28672×8192 83.3 against 102.1), 121.0 against 143.8
# at 48; block64 one warp: 135.3 against 167.9 at 64, 120.8 against 149.4 at 48. block_out (clusterR layers) kept
# on for block128 as in the bucket these replace: it was measured at M = 64 only, with the earlier configuration.
# Tenth session: block_out on the two ``pre`` buckets of block128 too (clusterR layers at M ≥ 65): the 7B synthetic
# w4s30g64c128 prefill of 64 × 32 tokens 120.4 → 58.3 ms (fp16 44.5), of 512 tokens 27.5 → 22.7 ms (fp16 29.9 in another
# process), benchmarks/RESULTS.md "Session 10". (block128 layers without a row map ignore block_out.)
# Eleventh session: the block64 M ≤ 16 bucket (M = 9-16: the hand-written kernel takes M = 2-8, the GEMV M = 1)
# from 4 warps / np 2 / 3 stages to 1 warp / np 4 / 4 stages, the best of `benchmarks/gemm.py --block-sweep --block-cluster
# --block-rows 64 --block-group 64 --block-sparsity 0.3 --sweep-batches 12,16` (28672×8192 cluster64 G64 at M = 16: 59.19
# against 84.49 µs); 7B synthetic end to end at B = 16: w4s50g16b64 4921.3 → 5747.9 tokens/s, w4s30g64c64 3935.3 →
# 4530.0 (benchmarks/RESULTS.md "Session 11", call 5); per layer at M = 16, block64 W4 S50 G16, µs: 4096² 10.04 → 8.44,
# 12288×4096 20.13 → 17.20, 22016×4096 30.07 → 22.63, 4096×11008 18.43 → 15.09, 28672×8192 62.06 → 41.64, 8192×28672
# 67.55 → 52.43 (calls 5 and 6).
# Twelfth session: block_out on block64's buckets from M = 17 (cluster64 layers; block64 layers ignore it), as block128
# has had since the fourth/tenth sessions: `GQSA_BLOCK_AB=block_out benchmarks/gemm.py --block-sweep --block-cluster
# --block-rows 64 --block-group 64 --block-sparsity 0.3 --sweep-batches 8,16,32,64,256,2048`: block-order stores won the
# sum of the three shapes at M = 32, 64, 256, 2048 and lost at 8 and 16; 7B synthetic w4s30g64c64 end to end, tokens/s
# at B = 12 / 16 / 32 / 64: 3612.6 / 4540.5 / 6562.1 / 7464.8 without, 3136.8 / 4030.2 / 6599.3 / 8437.2 with (prefill
# of 64 × 32 tokens 141.7 → 71.7 ms), so from M = 17 only (benchmarks/RESULTS.md "Session 12").
# Eighteenth session: the ``pre`` GEMM reads its scratch by TMA (``tma``, one bulk copy of each [R, np·G] weight tile)
# and the M ≥ 65 buckets were re-chosen (benchmarks/results/session18/kernel_call4_sweep4.py: 6 candidates and the
# table through launch_block, µs summed over 4096², 11008×4096, 4096×11008, 28672×8192 W4 S50 G16 — for height 64
# also cluster64 W4 S30 G64 — at M = 128, 256 | 512, 1024, 2048; benchmarks/RESULTS.md "Session 18"): block128 4 warps ×
# 128 tokens × 5 stages, 778 against the table's 866 at M ≤ 256 and 3023 against 3463 above (the same configuration
# without TMA: 798 and 3202); block64 above 256 8 warps × 256 tokens × 3 stages, 9013 against 9494, and at M = 512 the
# block128 configuration (block64 W4 S50 G16 alone: 739 against 778 for the table's, 768 for the 256-token tile; M =
# 257-511 not measured). Block64 at M = 65-256 keeps its non-``pre`` kernel (1470 against ≥ 1851).
# The pass's tiles per program × warps (kernel_call5_pass5.py, the 12 layers above, the pass alone): one tile and 4
# warps 521 µs summed against 578 for the four tiles of before (BlockConfig.pre_tiles now 1); 7B prefill of 512
# tokens with it, block128 0.956× fp16 against 0.923× in the run beside it (RESULTS "Session 18" item 4).
H200_BLOCK_TABLE = BlockTable(
    buckets=(
        (16, ((16, _B(block_m=16, np=4, num_warps=1, num_stages=3, waves=4.0, scale_after=False)),
              (64, _B(block_m=64, np=2, num_warps=4, num_stages=3, waves=2.0)),
              (1 << 62, _B(block_m=128, np=1, num_warps=4, num_stages=3, waves=1.0, scale_after=False)))),
        (64, ((16, _W(block_m=16, np=4, num_warps=1, num_stages=4, waves=4.0)),
              (32, _W(block_m=32, np=4, num_warps=1, num_stages=3, waves=4.0, block_out=True)),
              (64, _W(block_m=64, np=2, num_warps=1, num_stages=3, waves=4.0, block_out=True)),
              (256, _B(block_m=128, np=2, num_warps=4, num_stages=3, waves=1.0, scale_after=False, block_out=True)),
              (512, _P(block_m=128, np=4, num_warps=4, num_stages=5, split_k=1, block_out=True, tma=True)),
              (1 << 62, _P(block_m=256, np=4, num_warps=8, num_stages=3, split_k=1, block_out=True, tma=True)))),
        (128, ((16, _W(block_m=16, np=4, num_warps=2, num_stages=3, waves=4.0)),
               (32, _W(block_m=32, np=4, num_warps=2, num_stages=3, waves=2.0, block_out=True)),
               (64, _W(block_m=64, np=2, num_warps=2, num_stages=3, waves=2.0, block_out=True)),
               (256, _P(block_m=128, np=4, num_warps=4, num_stages=5, split_k=1, block_out=True, tma=True)),
               (1 << 62, _P(block_m=128, np=4, num_warps=4, num_stages=5, split_k=1, block_out=True, tma=True)))),
    ),
    expand_min_m=((16, 256), (64, 1 << 62)),  # block64 and up: never (the pre kernels beat the expansion)
    # Seventh session: W4 S0 G128 (3-bit layers run as it; block128, every group kept): the pre kernels do twice an
    # S50 layer's work and lost to the expansion at M = 256, 512 and 2048 on all three shapes (2048: 153.8 / 442.7
    # / 2098.6 µs against 106.9 / 293.7 / 1459.5; benchmarks/gemm.py --block-sweep --block-group 128
    # --block-sparsity 0, RESULTS "Session 7").
    dense_expand_min_m=256,
    # Eighth session: the same layers on the GEMV at M = 2 too: the block kernel does an S0 layer's whole work at
    # every M, the GEMV's cost grows by a row's gathers. RESULTS "Session 8", w3s0g128 7B end to end (call 2):
    # B = 2 600.1 against 560.7 tokens/s with the block kernel, B = 3 735.1 against 835.3 (so not at 3).
    dense_gemv_max_m=2,
    gemv_max_m=1,
    # Tenth session: the hand-written kernel (mma_block.cu) for block64 layers at M = 2-8 and block128 at M = 2-4, where
    # it beat the Triton block kernel (benchmarks/mma.py, RESULTS "Session 10", 6 shapes of LLaMA-2-7B/70B: block64
    # W4 S50 G16 geometric mean at M = 2 / 4 / 8 15.4 / 16.7 / 19.7 µs against 25.7 / 26.1 / 26.7, faster on every
    # shape; cluster128 W4 S30 G64 at M = 2 / 4 19.0 / 20.2 against 22.3 / 23.0, faster or equal on every shape; at
    # M = 8 it lost on three of the four 7B shapes and gained nothing end to end, 2889 against 2904 tokens/s). At
    # M = 16 it lost end to end (7B w4s50g16b64 B = 16: 4818 against 4908 tokens/s), at M = 1 to the GEMV (geometric
    # mean 14.8 against 14.1 µs). Heights 16/32 were not measured: never.
    # Eleventh session: with the 1-warp M ≤ 16 bucket above, the Triton kernel beats this one again from M = 9 on most
    # shapes (block64 W4 S50 G16 at M = 13, µs: 4096² 8.30, 12288×4096 17.22, 22016×4096 22.28, 28672×8192 41.64 against
    # the hand-written kernel's 10.82, 19.63, 30.01, 56.65 at M = 12), so the limit stays 8: 7B synthetic w4s50g16b64
    # B = 12 4549.6 tokens/s against 4051.8 with the kernel up to 12, w4s30g64c64 3603.7 against 3376.7
    # (benchmarks/RESULTS.md "Session 11", calls 6 and 7).
    # Thirteenth session: the kernel's revision 2 (the quads' feature offsets loaded a quad ahead, the activations
    # copied as whole 32-byte sectors into a swizzled [token][half] tile, ldmatrix.x4 for two n-tiles) is 5-30 % faster
    # at M = 4-16; block128/cluster128 W4 S30 G64 at M = 8, µs, mma against the Triton kernel on 4096², 22016×4096,
    # 28672×8192, 8192×28672: 9.97 / 24.65 / 43.27 / 38.21 against 10.21 / 26.28 / 51.64 / 53.91 (benchmarks/mma.py,
    # RESULTS "Session 13"), end to end w4s30g64c128 B = 8 2909.0 → 2967.8 tokens/s; with the kernel up to M = 16 on
    # both heights B = 12/16 lost (w4s50g16b64 4563.6 / 5746.7 → 4381.0 / 5185.3), so 8.
    mma_max_m=((64, 8), (128, 8)),
    tile_min_m=((16, 17), (32, 1 << 62)),  # block32 and up: never
    # Twelfth session: layers of groups of 64 (cluster64/128 W4 S30 G64) ran the `pre` kernels at M ≥ 257 at 0.3-0.7×
    # cuBLAS fp16, where the expansion ran at 0.63-1.06× (tuned on G16, the pre kernels take one group per step at G64):
    # `benchmarks/gemm.py --block-sweep --block-cluster --block-kinds table --block-rows 64,128 --block-group 64
    # --block-sparsity 0.3 --sweep-batches 512,1024,2048`, µs pre / expansion on 4096², 11008×4096, 28672×8192: height 128
    # M = 512 55.2 / 39.8, 138.2 / 99.9, 570.9 / 512.4; M = 2048 137.1 / 102.4, 374.1 / 287.6, 1809.2 / 1507.4; height
    # 64 (block-order stores) M = 2048 162.5 / 100.4, 469.6 / 280.6, 2244.9 / 1386.3; at M = 256 the pre kernels still
    # won on two of three (benchmarks/RESULTS.md "Session 12").
    group_expand_min_m=((64, 512),),
)


# Irregular (row-mask) layers. Measured on the H200 (benchmarks/gemm.py --sweep, session 6, 2026-12-01,
# benchmarks/RESULTS.md "Session 6"), the second kernel revision (weights as the A operand, codes in plane order,
# inline-PTX dequantization, positions one k-tile ahead, L2 prefetch): per bucket the candidate with the least total
# time over 4096×4096, 11008×4096 and 28672×8192 (W4 S50 G16) at M = 2, 4, 8, 16 / 32 / 64 / 128: at M ≤ 16 16×128
# tiles with a 128-register limit (4 programs of 4 warps per SM instead of 3: 28672×8192 at M = 16 100.3 → 91.5 µs),
# one stage everywhere (Triton's pipeliner lost at every M and shape). gemv_max_m = 3: the batched v2 GEMV beat the
# GEMM at M = 2 (77.4 against 122.5 µs summed over the three) and at M = 3 (107.4 µs, session 6 call 1, against the
# GEMM's 122.5–123.6 at M = 2 and 4: its time does not depend on M up to 16), and lost at M = 4 (135.1 against
# 123.6). expand_min_m = 256: per-call dense expansion + cuBLAS beat the GEMM at M = 256 (475.3 against 649.8 µs)
# and lost at M = 128 (428.8 against 366.2). Seventh session (the same sweep with ``halves`` candidates, RESULTS
# "Session 7"): halves won at M = 32 (32×128 tiles, 128 registers: 160.0 against 165.7 µs) and M = 128 (325.3
# against 363.3: the 128×128 tile no longer spills) and lost at M = 4, 16 and 64 (e.g. 64: 275.3 against 226.5).
_G = functools.partial(GemmConfig, num_warps=4, num_stages=1)
H200_TABLE = DispatchTable(
    gemv_max_m=3,
    buckets=(
        (16, _G(block_m=16, block_n=128, waves=2.0, prefetch=True, maxnreg=128)),
        (32, _G(block_m=32, block_n=128, waves=2.0, prefetch=True, maxnreg=128, halves=True)),
        (64, _G(block_m=64, block_n=128, waves=1.0)),
        (1 << 62, _G(block_m=128, block_n=128, waves=1.0, halves=True)),
    ),
    expand_min_m=256,
    block=H200_BLOCK_TABLE,
)


def table_to_json(table: DispatchTable) -> dict:
    out = {"gemv_max_m": table.gemv_max_m, "expand_min_m": table.expand_min_m,
           "buckets": [[m, dict(cfg.__dict__)] for m, cfg in table.buckets]}
    if table.block is not None:
        b = table.block
        out["block"] = {"max_rows": b.max_rows, "gemv_max_m": b.gemv_max_m,
                        "tile_min_m": [list(p) for p in b.tile_min_m],
                        "expand_min_m": [list(p) for p in b.expand_min_m],
                        "dense_expand_min_m": b.dense_expand_min_m, "dense_gemv_max_m": b.dense_gemv_max_m,
                        "mma_max_m": [list(p) for p in b.mma_max_m],
                        "group_expand_min_m": [list(p) for p in b.group_expand_min_m],
                        "buckets": [[r, [[m, dict(c.__dict__)] for m, c in bk]] for r, bk in b.buckets]}
    return out


def table_from_json(obj: dict) -> DispatchTable:
    try:
        buckets = tuple((int(m), GemmConfig(**cfg)) for m, cfg in obj["buckets"])
        exp = obj.get("expand_min_m")
        block = None
        if obj.get("block") is not None:
            b = obj["block"]
            block = BlockTable(
                buckets=tuple((int(r), tuple((int(m), BlockConfig(**c)) for m, c in bk)) for r, bk in b["buckets"]),
                expand_min_m=tuple((int(r), int(m)) for r, m in b.get("expand_min_m", ())),
                max_rows=int(b.get("max_rows", 128)), gemv_max_m=int(b.get("gemv_max_m", 0)),
                tile_min_m=tuple((int(r), int(m)) for r, m in b.get("tile_min_m", ())),
                dense_expand_min_m=None if b.get("dense_expand_min_m") is None else int(b["dense_expand_min_m"]),
                dense_gemv_max_m=int(b.get("dense_gemv_max_m", 0)),
                mma_max_m=tuple((int(r), int(m)) for r, m in b.get("mma_max_m", ())),
                group_expand_min_m=tuple((int(g), int(m)) for g, m in b.get("group_expand_min_m", ())))
            if not block.buckets or not all(bk for _, bk in block.buckets):
                raise ValueError("empty block buckets")
        return DispatchTable(gemv_max_m=int(obj["gemv_max_m"]), buckets=buckets,
                             expand_min_m=None if exp is None else int(exp), block=block)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a dispatch table: {e}") from None


def default_table(device: torch.device | None = None) -> DispatchTable:
    """:data:`H200_TABLE`, or the JSON file named by ``GQSA_DISPATCH_TABLE`` (as written by
    ``benchmarks/gemm.py --sweep``) — an explicit opt-in for tuning on another GPU."""
    path = os.environ.get("GQSA_DISPATCH_TABLE")
    if path:
        with open(path) as f:
            return table_from_json(json.load(f))
    return H200_TABLE


MAX_PREPARED = 64  # prepared calls a LinearPlan keeps (one per batch shape seen on the kernel paths)
# The irregular GEMM's layout: "copy" (the TileLayout's permuted copy of the weights, layout version 2: what every
# measurement so far used) or "canonical" (version 3: an index over the layer's own tensors, no second copy of the
# weights on the GPU; offline 5.4-5.6 instead of 4.8-5.0 SASS instructions per dense weight; session 8, 7B W4 S50 G16
# end to end: 2774 / 4365 / 6753 tokens/s at B = 16 / 32 / 64 against the copy's 3828 / 5874 / 7914, peak 5.69 against
# 8.47 GB at B = 16; benchmarks/RESULTS.md "Session 7", "Session 8"). GQSA_TILE_LAYOUT sets the default at import,
# LinearPlan(tile_layout=...) per layer.
TILE_LAYOUTS = ("copy", "canonical")
TILE_LAYOUT = os.environ.get("GQSA_TILE_LAYOUT", "copy").strip().lower()
if TILE_LAYOUT not in TILE_LAYOUTS:
    raise ValueError(f"GQSA_TILE_LAYOUT={TILE_LAYOUT!r}: use one of {', '.join(TILE_LAYOUTS)}")


class LinearPlan:
    """A packed layer prepared for every batch size (what ``GQSALinear`` holds on the GPU).

    Builds, once: the GEMV plan (canonical tensors, task table) and the tensor-core layout (a
    permuted copy of the packed tensors: the layer's packed bytes are held twice on the device; with
    ``tile_layout="canonical"`` an index over the layer's own tensors instead, see ``TILE_LAYOUT``).
    ``table``: a :class:`DispatchTable` (default: :func:`default_table`). ``dense_min_m``: opt-in dense
    cache (see the module docstring). Rebuild when the layer's tensors change or move.
    """

    def __init__(self, packed: PackedLinear, table: DispatchTable | None = None, dense_min_m: int | None = None,
                 gemv_plan: gemv.GemvPlan | None = None, tile_layout: str | None = None):
        gemv._check_packed(packed)
        self.tile_layout = tile_layout or TILE_LAYOUT
        if self.tile_layout not in TILE_LAYOUTS:
            raise ValueError(f"tile_layout={self.tile_layout!r}: use one of {', '.join(TILE_LAYOUTS)}")
        self.device = packed.row_ptr.device
        usable = gemv._triton_usable(self.device)
        if usable:  # 3-bit layers through the 4-bit kernels (the same weights)
            packed = gemv.kernel_packed(packed)
        self.packed = packed
        self.table = table or default_table(self.device)
        if not self.table.buckets:
            raise ValueError("a dispatch table needs at least one GEMM bucket")
        self.kernel_ok = packed.bits in gemv.KERNEL_BITS and usable
        self._gemv = gemv_plan
        self.block_rows = None  # R of a block-uniform layer (then self.block, no TileLayout)
        self.block = None
        self.layout = None
        if self.kernel_ok and self.table.block is not None and packed.group_size >= 16 \
                and not packed.group_size & (packed.group_size - 1):
            cap = self.table.block.max_rows
            self.block_rows = detect_block_rows(packed)
            if self.block_rows is not None:
                self.block = build_block_layout(packed, min(self.block_rows, cap))
            else:  # clusterR: blocks of non-consecutive rows through a row map
                found = detect_row_clusters(packed, tuple(r for r in BLOCK_ROWS if r <= cap))
                if found is not None:
                    self.block_rows, row_map = found
                    self.block = build_block_layout(packed, self.block_rows, row_map=row_map)
        # a block layer that keeps (nearly) every group: BlockTable.dense_expand_min_m
        self.block_dense = (self.block is not None
                            and packed.nnz >= DENSE_KEEP * packed.shape[0] * packed.n_group_cols)
        if self.block is None and self.kernel_ok:
            self.layout = self._tile_layout()
        if self.kernel_ok and self._gemv is None and (self.block is None or self.table.block.gemv_max_m > 0):
            self._gemv = gemv.prepare(packed)
        self.sms = num_sms(self.device)
        # the hand-written kernel (block layers it takes, on a GPU where it may run): compiled, and its layout built, at
        # the first call in its range (loading a model compiles nothing)
        self.mma_ok = (self.block is not None and self.table.block.mma_upto(self.block.rows) > 0
                       and mma_unsupported(self.block) is None and mma_may_run(self.device))
        self._mma = None
        self.dense_min_m = dense_min_m
        self._dense = None
        self._calls: dict = {}  # (x.shape, x.stride(), dtype, no bias) -> a prepared V2Call / BlockCall / GemmCall / DenseCall

    @property
    def gemv(self) -> gemv.GemvPlan:
        """The canonical-layout GEMV plan (built on first use for block-uniform layers)."""
        if self._gemv is None:
            self._gemv = gemv.prepare(self.packed)
        return self._gemv

    @property
    def mma(self):
        """The hand-written kernel's :class:`~gqsa.kernels.mma_layout.MmaLayout` (built on first use)."""
        if self._mma is None:
            self._mma = build_mma_layout(self.block)
        return self._mma

    def path(self, m: int) -> str:
        """Which kernel serves ``m`` rows: ``"mma"`` or ``"block"`` (block-uniform layers), ``"gemv"``,
        ``"gemm"``, ``"expand"``, ``"dense-cache"`` or ``"reference"``. (``"mma"`` for fp16 calls; others
        take ``"block"`` there.)"""
        if not self.kernel_ok:
            return "reference"
        if self.dense_min_m is not None and m >= self.dense_min_m:
            return "dense-cache"
        if self.block is not None:
            exp = self.table.block.expand_for(self.block.rows, self.packed.group_size, self.block_dense)
            if exp is not None and m >= exp:
                return "expand"
            tile = self.table.block.tile_from(self.block.rows)
            if tile is not None and m >= tile:
                return "gemm"
            gemv_max = self.table.block.gemv_max_m
            if self.block_dense:
                gemv_max = max(gemv_max, self.table.block.dense_gemv_max_m)
            if m <= gemv_max:
                return "gemv"
            return "mma" if self.mma_ok and m <= self.table.block.mma_upto(self.block.rows) else "block"
        if self.table.expand_min_m is not None and m >= self.table.expand_min_m:
            return "expand"
        return "gemv" if m <= self.table.gemv_max_m else "gemm"

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # a batch shape seen before on a kernel path: its prepared call (no checks to redo but the device and
        # the bias; grid, constexprs and split-K fixed; the compiled kernel called directly)
        key = (x.shape, x.stride(), x.dtype, bias is None)
        fast = self._calls.get(key)
        if fast is not None and x.device == self.device and (bias is None or self._bias_ok(bias, x.dtype)):
            n = self.packed.shape[0]
            y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
            fast(x.view(-1, x.shape[-1]), bias, y.view(-1, n))
            return y
        p = self.packed
        n, k = p.shape
        if (not self.kernel_ok or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] != k
                or x.device != self.device):
            return gemv.gqsa_linear(x, p, bias)  # validates, then reference / dense for fp32
        if bias is not None:
            if bias.shape != (n,) or bias.device != self.device:
                return gemv.gqsa_linear(x, p, bias)  # raises the one-line error
            if bias.dtype != x.dtype or not bias.is_contiguous():
                bias = bias.to(x.dtype).contiguous()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        path = self.path(m)
        if path == "dense-cache":
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = gemv.dequantize_dense(p, x.dtype)
            return F.linear(x, self._dense, bias)
        viewed = x2.data_ptr() == x.data_ptr() and x2.stride(1) == 1  # x2 is x, viewed: the call can be kept
        if path == "gemv":
            call = self.gemv.v2_call(x2, bias is not None) if viewed else None
            if call is None:
                return self.gemv(x, bias)
        elif path == "expand":
            if not viewed:
                return gemv.gqsa_linear(x, p, bias, variant="dense")
            call = gemv.DenseCall(p)
        else:
            if x2.stride(1) != 1:
                x2 = x2.contiguous()
            if m == 0:
                return torch.empty(*lead, n, dtype=x.dtype, device=x.device)
            call = self._mma_call(m, bias is not None, x2.stride(0)) if path == "mma" and x.dtype == torch.float16 \
                else None
            if call is None and path in ("block", "mma"):
                cfg = for_group(self.table.block.config(self.block.rows, m), p.group_size)
                call = BlockCall(self.block, cfg, m, x.dtype, bias is not None, x2.stride(0), n, self.sms)
            elif call is None:
                if self.layout is None:  # a block layer in its irregular-GEMM range: the TileLayout on first use
                    self.layout = self._tile_layout()
                call = GemmCall(self.layout, self.table.config(m), m, x.dtype, bias is not None, x2.stride(0), n,
                                self.sms)
        y = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
        call(x2, bias, y.view(-1, n))
        if viewed and len(self._calls) < MAX_PREPARED:
            self._calls[key] = call
        return y

    def _mma_call(self, m: int, has_bias: bool, stride_x: int):
        """The hand-written kernel's call, or None (then for good) where it does not compile: the probe compilation
        of :func:`~gqsa.kernels.mma_gemm.available` (once per device) at the first call, then this specialization."""
        if not mma_available(self.device):
            self.mma_ok = False
            return None
        try:
            return MmaCall(self.mma, MmaConfig(), m, has_bias, stride_x, self.packed.shape[0], self.sms)
        except (RuntimeError, ValueError) as e:
            warnings.warn(f"gqsa: the hand-written kernel failed ({str(e).splitlines()[0] if str(e) else e!r}); the "
                          "Triton block kernel serves this layer instead", stacklevel=3)
            self.mma_ok = False
            return None

    def _tile_layout(self):
        return build_tile_layout(self.packed, canonical=self.tile_layout == "canonical")

    def _bias_ok(self, bias: torch.Tensor, dtype: torch.dtype) -> bool:
        """A bias the prepared calls take as it is (else the checked path converts it or raises)."""
        return (bias.dtype == dtype and bias.device == self.device and bias.shape == (self.packed.shape[0],)
                and bias.is_contiguous())


def prepare(packed: PackedLinear, table: DispatchTable | None = None, dense_min_m: int | None = None,
            tile_layout: str | None = None) -> LinearPlan:
    """:class:`LinearPlan` for ``packed``."""
    return LinearPlan(packed, table, dense_min_m, tile_layout=tile_layout)

