"""Load-time layout of a *block-uniform* packed layer (``--allocation blockR``) for the block kernels
(:mod:`gqsa.kernels.block_gemm`): layout version ``BLOCK_LAYOUT_VERSION`` (1), separate from the
irregular :class:`~gqsa.kernels.layout.TileLayout`.

A packed layer is **block-uniform with R rows** when every run of ``R`` consecutive output rows
``b·R … b·R+R−1`` (R-aligned; the last block may be partial) keeps the same group columns — same
count, same ``col_idx`` — in every row. Blocks may keep different numbers of groups. The on-disk
format does not change: :func:`detect_block_rows` finds, at load time, the largest ``R`` in
``(128, 64, 32, 16)`` that holds (None: the layer takes the irregular path), and
:func:`build_block_layout` repacks the canonical tensors once, in the order the kernels consume:

* ``block_ptr`` int32 ``[n_blocks + 1]``: block ``b`` owns *slots* ``block_ptr[b] … block_ptr[b+1]−1``,
  one slot per kept group column of the block, in ascending column order, padded to a multiple of
  ``8/bits`` slots (padding slots: column −1, codes, scales and zero points 0);
* ``cols`` int32 ``[n_slots]``: the group column of each slot (shared by the R rows of the block — one
  activation gather per kept group serves R output rows);
* ``qweight`` uint8 ``[n_slots · bits/8, R, G]`` *byte tiles*: byte ``[u, r, t]`` holds feature ``t`` of
  row ``r`` for the ``8/bits`` slots ``u·8/bits + c`` (slot ``c`` at bits ``c·bits``). One slot tuple
  of a block is one contiguous ``R·G``-byte run (``G`` bytes per row: 16-byte vectors at G = 16), and
  the codes of one slot come out of it with one shift and one mask per byte, already in the
  ``[R, G]`` shape of a tensor-core operand (no reshape, no gather);
* ``sz`` int32 ``[n_slots, R]``: the scale's float16 bits in the low half-word, the zero point's (the
  integer, or the float16 bits) in the high one — one coalesced R-vector load per slot (``scales`` and
  ``zeros`` are views computed from it);
* rows of the partial last block beyond ``N`` are padding too (code 0, scale 0, zero point 0);
* ``row_map`` (``--allocation clusterR``, :func:`detect_row_clusters`): blocks of rows that are not
  consecutive — any rows with identical kept columns, grouped and cut into blocks of R. ``row_map[b·R+r]``
  is the output row of row ``r`` of block ``b`` (−1: padding at the end of a group's last block); the
  kernel stores through it. None for R-aligned consecutive blocks.

Every code, scale and zero point is the canonical one, bit for bit, only permuted (the tests check
:func:`dequantize` against :func:`gqsa.kernels.reference.dequantize` for equality).
Memory: the packed codes once more, 4 bytes of ``sz`` per kept group and row (against 3 canonical), the
column list and padding slots (the canonical tensors stay, as the format and for the GEMV).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import quant
from ..format import PackedLinear

BLOCK_LAYOUT_VERSION = 1
BLOCK_ROWS = (128, 64, 32, 16)  # candidate block heights, largest first


@dataclass
class BlockLayout:
    """A block-uniform packed layer in the block kernels' order (see the module docstring)."""

    qweight: torch.Tensor  # uint8 [n_slots · bits/8, R, G]: byte tiles
    cols: torch.Tensor  # int32 [n_slots], −1 for padding slots
    sz: torch.Tensor  # int32 [n_slots, R]: scale bits | zero point bits << 16 (what the kernel loads)
    block_ptr: torch.Tensor  # int32 [n_blocks + 1]
    shape: tuple[int, int]
    bits: int
    group_size: int
    rows: int  # R
    float_zeros: bool
    max_slots: int  # most slots (padded kept groups) of any block
    row_map: torch.Tensor | None = None  # int32 [n_blocks · R]: output row of each block row (−1: padding)
    row_pos: torch.Tensor | None = None  # int64 [N]: the block row of each output row (row_map's inverse)
    version: int = BLOCK_LAYOUT_VERSION
    uniform_slots: int = 0  # slots of every block where all blocks have the same number (> 0), else 0

    @property
    def scales(self) -> torch.Tensor:
        """float16 ``[n_slots, R]`` (from ``sz``)."""
        return (self.sz & 0xFFFF).to(torch.int16).view(torch.float16)

    @property
    def zeros(self) -> torch.Tensor:
        """uint8 (or float16 for float zero points) ``[n_slots, R]`` (from ``sz``)."""
        z = (self.sz >> 16) & 0xFFFF
        return z.to(torch.int16).view(torch.float16) if self.float_zeros else z.to(torch.uint8)

    @property
    def n_blocks(self) -> int:
        return self.block_ptr.numel() - 1

    @property
    def n_slots(self) -> int:
        return self.cols.numel()

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes the kernel reads (the codes, ``sz``, ``cols``, ``block_ptr``)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.sz, self.cols, self.block_ptr))


def _uniform(row_ptr: torch.Tensor, col_idx: torch.Tensor, n: int, r: int) -> bool:
    """Whether every R-aligned block of rows keeps identical group columns."""
    rp = row_ptr.to(torch.int64)
    counts = rp[1:] - rp[:-1]
    first = (torch.arange(n, device=rp.device) // r) * r  # first row of each row's block
    if not bool((counts == counts[first]).all()):
        return False
    nnz = col_idx.numel()
    if nnz == 0:
        return True
    rows = torch.repeat_interleave(torch.arange(n, device=rp.device), counts, output_size=nnz)
    pos = torch.arange(nnz, device=rp.device) - rp[rows]
    return bool((col_idx == col_idx[rp[first[rows]] + pos]).all())


def detect_block_rows(packed: PackedLinear, candidates=BLOCK_ROWS) -> int | None:
    """The largest ``R`` of ``candidates`` for which ``packed`` is block-uniform, or None.

    A layer uniform with R rows is uniform with every divisor of R, so the candidates are tried from
    the smallest up and the search stops at the first that fails.
    """
    n = packed.shape[0]
    best = None
    for r in sorted(candidates):
        if r < 16 or r & (r - 1):
            raise ValueError(f"block heights must be powers of two ≥ 16, got {r}")
        if not _uniform(packed.row_ptr, packed.col_idx, n, r):
            break
        best = r
    return best


# On a GPU a layer's plan (gqsa.kernels.dispatch.LinearPlan) holds its canonical tensors and its kernels' layouts;
# per packed byte, measured on 4096×4096 W4 layers (session 13; tests/kernels/test_block.py checks them on smaller
# ones): row masks 2.30 (the tile GEMM's permuted copy, the GEMV's scale words), block and cluster masks 2.23, and
# 3.16 once the hand-written kernel's layout is built (the first batch of 2-8 rows).
RESIDENT_PER_PACKED_BYTE = {"irregular": 2.35, "block": 3.2}  # (upper bounds of those figures)


def resident_bytes(packed_bytes: int, layout: str) -> int:
    """About how many bytes of GPU memory a layer of ``packed_bytes`` with kernel ``layout`` (as
    :func:`kernel_layout` names it) takes once its plan is built (at most: the block layers' hand-written-kernel
    layout is built at the first batch of 2-8 rows)."""
    kind = "irregular" if layout == "irregular" else "block"
    return int(RESIDENT_PER_PACKED_BYTE[kind] * packed_bytes)


def kernel_layout(packed: PackedLinear) -> str:
    """Which kernels a packed layer can use, as ``gqsa inspect`` prints it: ``blockR`` (block-uniform with
    R rows: the block kernel), ``clusterR`` (R-row clusters through a row map: the block kernel) or
    ``irregular`` (the decode GEMV and the tile GEMM)."""
    r = detect_block_rows(packed)
    if r is not None:
        return f"block{r}"
    found = detect_row_clusters(packed)
    return f"cluster{found[0]}" if found is not None else "irregular"


def detect_row_clusters(packed: PackedLinear, candidates=BLOCK_ROWS):
    """Blocks of rows that are not consecutive (``--allocation clusterR``): rows with identical kept
    columns grouped, each group cut into blocks of ``R`` rows (the last block of a group padded). Returns
    ``(R, row_map)`` for the largest ``R`` of ``candidates`` whose padding stays within one block
    (``n_blocks · R ≤ N + R``), ``row_map`` int32 ``[n_blocks · R]`` (the output row of every block row,
    −1 for padding), or None."""
    n = packed.shape[0]
    dev = packed.row_ptr.device
    rp = packed.row_ptr.to(torch.int64)
    counts = rp[1:] - rp[:-1]
    mask = torch.zeros(n, packed.n_group_cols, dtype=torch.bool, device=dev)
    if packed.nnz:
        rows = torch.repeat_interleave(torch.arange(n, device=dev), counts, output_size=packed.nnz)
        mask[rows, packed.col_idx.long()] = True
    _, cluster = torch.unique(mask, dim=0, return_inverse=True)
    sizes = torch.bincount(cluster)
    order = torch.argsort(cluster, stable=True)  # rows grouped by cluster, ascending inside
    start = torch.cumsum(sizes, 0) - sizes
    pos = torch.empty_like(order)
    pos[order] = torch.arange(n, device=dev) - start[cluster[order]]  # rank of each row in its cluster
    for r in sorted(candidates, reverse=True):
        blocks = -(-sizes // r)
        if int(blocks.sum()) * r > n + r:
            continue
        bstart = torch.cumsum(blocks, 0) - blocks
        row_map = torch.full((int(blocks.sum()) * r,), -1, dtype=torch.int32, device=dev)
        row_map[(bstart[cluster] + pos // r) * r + pos % r] = torch.arange(n, dtype=torch.int32, device=dev)
        return r, row_map
    return None


def build_block_layout(packed: PackedLinear, rows: int | None = None, device=None,
                       row_map: torch.Tensor | None = None) -> BlockLayout:
    """Repack a block-uniform ``packed`` into :class:`BlockLayout` with ``rows`` rows per block
    (default: :func:`detect_block_rows`). ``row_map`` (from :func:`detect_row_clusters`, with its
    ``rows``): blocks of non-consecutive rows. Raises ``ValueError`` when the layer is not uniform at
    that height (or under that map) or the format cannot be expressed."""
    n, k = packed.shape
    g, bits = packed.group_size, packed.bits
    if bits not in (2, 4, 8):
        raise ValueError(f"the block layout holds 2-, 4- or 8-bit codes, got {bits}")
    if g < 16 or g & (g - 1):
        raise ValueError(f"the block kernels need a power-of-two group size ≥ 16, got {g}")
    if row_map is not None:
        if rows is None or rows < 16 or rows & (rows - 1) or row_map.numel() % rows:
            raise ValueError("a row map needs its block height (a power of two ≥ 16 dividing its length)")
    elif rows is None:
        rows = detect_block_rows(packed)
        if rows is None:
            raise ValueError("the layer is not block-uniform (no R in 16..128 with identical kept columns)")
    elif rows < 16 or rows & (rows - 1) or not _uniform(packed.row_ptr, packed.col_idx, n, rows):
        raise ValueError(f"the layer is not block-uniform with {rows} rows per block")
    dev = torch.device(device) if device is not None else packed.row_ptr.device
    cpb = 8 // bits
    rp = packed.row_ptr.to(dev, torch.int64)
    col = packed.col_idx.to(dev, torch.int64)
    if row_map is None:
        nb = max(1, -(-n // rows))
        vrow = torch.arange(nb * rows, device=dev)
        vrow = torch.where(vrow < n, vrow, -1)
    else:
        vrow = row_map.to(dev, torch.int64)
        nb = vrow.numel() // rows
        if nb == 0 or bool((vrow.reshape(nb, rows)[:, 0] < 0).any()) or vrow.max() >= n:
            raise ValueError("a row map's blocks must start with a real row")
        real_rows = vrow[vrow >= 0]
        if real_rows.numel() != n or torch.unique(real_rows).numel() != n:
            raise ValueError("a row map must name every output row once")
    vrow = vrow.reshape(nb, rows)
    first = vrow[:, 0].clamp(min=0)  # first row of each block
    counts = rp[(first + 1).clamp(max=n)] - rp[first.clamp(max=n)]  # kept groups per block
    if n == 0:
        counts = torch.zeros_like(counts)
    padded = -(-counts // cpb) * cpb  # slots per block: a multiple of the codes per byte
    bptr = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
    bptr[1:] = torch.cumsum(padded, 0)
    t_all = int(bptr[-1])
    if t_all * rows * g >= 2**31:
        raise ValueError(f"layer too large for 32-bit offsets ({t_all} slots of {rows} rows)")
    blk = torch.repeat_interleave(torch.arange(nb, device=dev), padded, output_size=t_all)  # block of each slot
    j = torch.arange(t_all, device=dev) - bptr[blk]  # slot index inside its block
    real = j < counts[blk]  # False: padding slot
    row = vrow[blk]  # [T, R] output row of each (slot, block row), −1 for padding
    valid = real[:, None] & (row >= 0)
    src = torch.where(valid, rp[row.clamp(min=0)] + j[:, None], 0)  # canonical group index, [T, R]
    cols = torch.where(real, col[torch.where(real, rp[first[blk]] + j, 0)] if packed.nnz else 0, -1)
    if packed.nnz:
        codes_c = quant.unpack_codes(packed.qweight.to(dev), bits, g)[src]  # [T, R, G]
        sc, zr = packed.scales.to(dev)[src], packed.zeros.to(dev)[src]
    else:
        codes_c = torch.zeros(t_all, rows, g, dtype=torch.uint8, device=dev)
        sc = torch.zeros(t_all, rows, dtype=torch.float16, device=dev)
        zr = torch.zeros(t_all, rows, dtype=packed.zeros.dtype, device=dev)
    codes_c = torch.where(valid[..., None], codes_c, 0).reshape(t_all // cpb, cpb, rows, g)
    # slot u·cpb + c of a block sits at bits c·bits of byte tile u (uint8 all along: no wide temporaries)
    qb = codes_c[:, 0].clone()
    for c in range(1, cpb):
        qb |= codes_c[:, c] << (c * bits)
    qb = qb.contiguous()
    scales = torch.where(valid, sc, 0).contiguous()
    zeros = torch.where(valid, zr, 0).to(zr.dtype).contiguous()
    zbits = zeros.view(torch.int16).to(torch.int32) & 0xFFFF if zeros.dtype == torch.float16 else zeros.to(torch.int32)
    sz = (scales.view(torch.int16).to(torch.int32) & 0xFFFF) | (zbits << 16)
    if row_map is not None:  # every block row must keep exactly its block's columns
        rows_ok = (vrow < 0) | ((rp[vrow.clamp(min=0) + 1] - rp[vrow.clamp(min=0)]) == counts[:, None])
        if not bool(rows_ok.all()) or (packed.nnz and not bool(
                (torch.where(valid, col[src], cols[:, None].to(torch.int64)) == cols[:, None]).all())):
            raise ValueError("the layer's rows do not share their kept columns in the blocks of the row map")
    row_pos = None
    if row_map is not None:
        flat = vrow.reshape(-1)
        real = torch.nonzero(flat >= 0).squeeze(1)
        row_pos = torch.empty(n, dtype=torch.int64, device=dev)
        row_pos[flat[real]] = real
    return BlockLayout(qweight=qb, sz=sz.contiguous(),
                       cols=cols.to(torch.int32).contiguous(), block_ptr=bptr.to(torch.int32), shape=(int(n), int(k)),
                       bits=int(bits), group_size=int(g), rows=int(rows), float_zeros=bool(packed.float_zeros),
                       max_slots=int(padded.max()) if nb else 0,
                       row_map=None if row_map is None else vrow.reshape(-1).to(torch.int32).contiguous(),
                       row_pos=row_pos, uniform_slots=int(padded[0]) if nb and int(padded[0]) and bool(
                           (padded == padded[0]).all()) else 0)


def codes(layout: BlockLayout) -> torch.Tensor:
    """uint8 codes ``[n_slots, R, G]`` of a layout (the byte tiles unpacked; tests and the torch twin)."""
    cpb = 8 // layout.bits
    shifts = (torch.arange(cpb, device=layout.device, dtype=torch.int32) * layout.bits)[None, :, None, None]
    q = (layout.qweight.to(torch.int32)[:, None] >> shifts) & ((1 << layout.bits) - 1)  # [U, cpb, R, G]
    return q.reshape(-1, layout.rows, layout.group_size).to(torch.uint8)


def dequantize(layout: BlockLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight from a :class:`BlockLayout` (pure torch): the twin of the kernels, equal
    bit for bit to :func:`gqsa.kernels.reference.dequantize` of the canonical layer."""
    n, k = layout.shape
    g, r = layout.group_size, layout.rows
    dev = layout.device
    n_cols = -(-k // g)
    w = quant.dequantize(codes(layout), layout.scales.float(), layout.zeros.float())  # [T, R, G]
    bp = layout.block_ptr.to(torch.int64)
    blk = torch.repeat_interleave(torch.arange(layout.n_blocks, device=dev), bp[1:] - bp[:-1],
                                  output_size=layout.n_slots)
    real = layout.cols >= 0
    dense = torch.zeros(layout.n_blocks, r, n_cols, g, dtype=torch.float32, device=dev)
    dense[blk[real], :, layout.cols[real].long()] = w[real]
    dense = dense.reshape(layout.n_blocks * r, n_cols * g)
    if layout.row_map is not None:  # block rows → output rows
        out = torch.zeros(n, n_cols * g, dtype=torch.float32, device=dev)
        keep = layout.row_map >= 0
        out[layout.row_map[keep].long()] = dense[keep]
        dense = out
    return dense[:n, :k].to(dtype)


def linear(x: torch.Tensor, layout: BlockLayout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(layout)ᵀ (+ bias)`` in the dtype of ``x`` (pure torch)."""
    return torch.nn.functional.linear(x, dequantize(layout, x.dtype), bias)
