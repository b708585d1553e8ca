"""Load-time kernel layout of a packed GQSA layer for the tensor-core kernel (:mod:`gqsa.kernels.gemm`).

The on-disk format (``row_ptr / col_idx / qweight / scales / zeros``, :mod:`gqsa.format`) stays the
canonical one; :func:`build_tile_layout` repacks it once, on the host side of a load, into the order
the tensor-core kernel consumes:

* the output rows are cut into **row blocks** of ``ROW_BLOCK`` (16) rows and the group columns into
  **k-tiles** of ``KT = BLOCK_K / G`` columns (``BLOCK_K`` = 128 input features, so one k-tile is one
  ``tl.dot`` step of the kernel);
* the kept groups of one (k-tile, row block) — a *chunk* — are stored contiguously, row by row, each
  row's groups in ascending column order; chunks are ordered k-tile-major
  (``chunk = kt · n_row_blocks + rb``), so the chunks one program reads for a ``BLOCK_N``-row tile at a
  k-tile are adjacent in memory;
* one int32 word per row and k-tile replaces ``col_idx``: ``meta[kt, n] = (first << 8) | mask`` —
  bit ``j`` of ``mask`` is set when row ``n`` keeps group column ``kt·KT + j``, and ``first`` is the
  index of the row's first kept group of that k-tile relative to ``kt_start[kt]``, the first group of
  the k-tile (chunks are k-tile-major). Group ``j`` of the row sits at
  ``kt_start[kt] + first + popcount(mask & (2^j − 1))``. One load per row per k-tile and no dependent
  metadata load: 0.25 bit per weight, against 0.5 for ``col_idx`` at 50 % sparsity, G16.
* ``qweight`` holds the canonical groups permuted into that group order, each group's codes in **plane
  order** (layout version 2): with ``c = 8 / bits`` codes per byte and ``B = G / c`` bytes per group, byte
  ``i``'s ``j``-th field (bits ``j·bits …``) holds feature ``j·B + i`` of the group (canonically it holds
  feature ``c·i + j``). The ``j``-th fields of a group's bytes are then ``B`` *consecutive* features, so the
  kernel turns ``B`` loaded bytes into ``c`` runs of consecutive features (one shift and mask, or for 4 bits
  one inline-PTX step for both nibbles) without moving any code between registers: each run is the A
  operand of its own ``tl.dot`` against the matching rows of x.
* ``sz`` packs each group's scale and zero point into one int32 word, ``scale bits | zero bits << 16``
  (the zero point as uint8 or, for float zeros, as fp16 bits): one load per group.

Nothing here requires a regular pattern: rows keep any number of groups in any k-tile, empty rows and
empty k-tiles are legal, ``K % G != 0`` is legal (the last k-tile is partial).

**Canonical view** (``build_tile_layout(..., canonical=True)``, layout version 3): no copy of the weights. A row's
kept groups of one k-tile are already consecutive in the canonical order (rows in order, columns ascending), so
the kernel reads the layer's own ``qweight`` / ``scales`` / ``zeros`` (what the decode GEMV reads too) through
the same ``meta`` words, ``first`` now counted from the row's first group ``row_base[n] = row_ptr[n]``
(``kt_start`` all zero): group ``j`` sits at ``row_base[n] + first + popcount(mask & (2^j − 1))``. Its codes stay
in canonical order (field ``j`` of byte ``i`` = feature ``c·i + j``), so plane ``j`` meets every ``c``-th row of
xᵀ; scale and zero point are two loads. Memory: the ``meta`` words and ``row_base`` only (about 0.25 bit per
weight at G16, against the full second copy of the chunk layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import PackedLinear

ROW_BLOCK = 16  # rows per chunk (the smallest N tile of a tensor-core kernel)
BLOCK_K = 128  # input features per k-tile (one tl.dot step)
LAYOUT_VERSION = 2  # 2: codes in plane order, scale and zero point in one word (sz)
CANONICAL_VERSION = 3  # 3: the canonical view (no copy of the weights)


@dataclass
class TileLayout:
    """A packed layer in the tensor-core kernel's order (see the module docstring)."""

    qweight: torch.Tensor  # uint8 [nnz, G·bits/8], chunk order, plane order inside a group
    sz: torch.Tensor  # int32 [nnz]: scale bits | zero bits << 16
    meta: torch.Tensor  # int32 [n_ktiles, n_pad]  (n_pad = n_row_blocks · ROW_BLOCK): (first << 8) | mask
    kt_start: torch.Tensor  # int32 [n_ktiles + 1]
    shape: tuple[int, int]
    bits: int
    group_size: int
    float_zeros: bool
    nnz: int
    block_k: int = BLOCK_K
    row_block: int = ROW_BLOCK
    version: int = LAYOUT_VERSION
    # canonical view (version 3): the layer's own scales / zeros (sz empty) and each row's first group
    scales_c: torch.Tensor | None = None
    zeros_c: torch.Tensor | None = None
    row_base: torch.Tensor | None = None  # int32 [n_pad]

    @property
    def canonical(self) -> bool:
        return self.row_base is not None

    @property
    def groups_per_ktile(self) -> int:
        return self.block_k // self.group_size

    @property
    def n_ktiles(self) -> int:
        return self.meta.shape[0]

    @property
    def n_pad(self) -> int:
        return self.meta.shape[1]

    @property
    def n_row_blocks(self) -> int:
        return self.n_pad // self.row_block

    @property
    def mask(self) -> torch.Tensor:
        """uint8 ``[n_ktiles, n_pad]``: the kept-group bits of each row and k-tile."""
        return (self.meta & 0xFF).to(torch.uint8)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes the layout holds beyond the layer's own tensors (the canonical view shares them)."""
        own = (self.meta, self.kt_start, self.row_base) if self.canonical else \
            (self.qweight, self.sz, self.meta, self.kt_start)
        return sum(t.numel() * t.element_size() for t in own)

    @property
    def scales(self) -> torch.Tensor:
        """float16 ``[nnz]``, in the layout's group order (decoded from ``sz``)."""
        if self.canonical:
            return self.scales_c
        return (self.sz & 0xFFFF).to(torch.int16).view(torch.float16)

    @property
    def zeros(self) -> torch.Tensor:
        """uint8 or float16 ``[nnz]``, in the layout's group order (decoded from ``sz``)."""
        if self.canonical:
            return self.zeros_c
        hi = (self.sz >> 16) & 0xFFFF
        return hi.to(torch.int16).view(torch.float16) if self.float_zeros else hi.to(torch.uint8)


def _plane_order(qweight: torch.Tensor, bits: int, g: int, inverse: bool = False) -> torch.Tensor:
    """Canonical → plane order of the codes of each group (module docstring); ``inverse``: back. In uint8,
    without a wider temporary (a 70B layer's codes are ~10^8 bytes)."""
    cpb = 8 // bits
    if cpb == 1 or qweight.numel() == 0:
        return qweight.clone()
    nb, qm = g // cpb, (1 << bits) - 1
    q = qweight.reshape(-1, nb)
    fields = torch.stack([(q >> (j * bits)) & qm for j in range(cpb)], dim=-1)  # [nnz, byte i, field j]
    if inverse:  # field j of byte i is feature j·B + i: features in order, then canonical bytes (c·i + j)
        x = fields.transpose(1, 2).reshape(-1, nb, cpb)
    else:  # canonical: field j of byte i is feature c·i + j; plane order wants feature j·B + i there
        x = fields.reshape(-1, cpb, nb).transpose(1, 2)
    out = x[..., 0].clone()
    for j in range(1, cpb):
        out |= x[..., j] << (j * bits)
    return out.reshape(qweight.shape)


def _pack_sz(scales: torch.Tensor, zeros: torch.Tensor, float_zeros: bool) -> torch.Tensor:
    s = scales.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    z = zeros.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF if float_zeros else zeros.to(torch.int32)
    return s | (z << 16)


def build_tile_layout(packed: PackedLinear, block_k: int = BLOCK_K, device=None, canonical: bool = False) -> TileLayout:
    """Repack ``packed`` into the tensor-core kernel layout (vectorized torch on the layer's device); with
    ``canonical`` only its index (the canonical view, see the module docstring: the layer's own tensors).

    ``block_k`` (input features per k-tile) must be a multiple of the group size with at most 8
    groups per k-tile (the mask is one byte). Raises ``ValueError`` for layouts it cannot express.
    """
    n, k = packed.shape
    g = packed.group_size
    if block_k % g or not 1 <= block_k // g <= 8:
        raise ValueError(f"block_k={block_k} must be a multiple of group_size={g} holding at most 8 groups")
    dev = torch.device(device) if device is not None else packed.row_ptr.device
    kt_groups = block_k // g
    n_cols = packed.n_group_cols
    n_kt = max(1, -(-n_cols // kt_groups))
    n_rb = max(1, -(-n // ROW_BLOCK))
    n_pad = n_rb * ROW_BLOCK
    nnz = packed.nnz
    rp = packed.row_ptr.to(dev, torch.int64)
    col = packed.col_idx.to(dev, torch.int64)
    rows = torch.repeat_interleave(torch.arange(n, device=dev), rp[1:] - rp[:-1], output_size=nnz)
    kt = col // kt_groups
    j = col % kt_groups
    # k-tile-major, then row, then column (16-row chunks are then contiguous too)
    key = (kt * n_pad + rows) * kt_groups + j
    perm = torch.argsort(key, stable=True)
    mask = torch.zeros(n_kt * n_pad, dtype=torch.int32, device=dev)
    mask.index_add_(0, kt * n_pad + rows, (1 << j).to(torch.int32))
    # first kept group of each (k-tile, row) in chunk order, relative to the k-tile's first group
    row_counts = torch.bincount(kt * n_pad + rows, minlength=n_kt * n_pad).reshape(n_kt, n_pad)
    first = torch.cumsum(row_counts, 1) - row_counts
    kt_start = torch.zeros(n_kt + 1, dtype=torch.int64, device=dev)
    kt_start[1:] = torch.cumsum(row_counts.sum(1), 0)
    if nnz >= 2**31:
        raise ValueError(f"layer too large for 32-bit group indices (nnz={nnz})")
    if n_pad * kt_groups >= 2**23:
        raise ValueError(f"layer has too many rows for the tile layout ({n} ≥ {2**23 // kt_groups})")
    if canonical:  # first counted from the row's first group; the layer's own tensors
        first = torch.cumsum(row_counts, 0) - row_counts
        meta = (first << 8) | mask.reshape(n_kt, n_pad).to(torch.int64)
        row_base = torch.zeros(n_pad, dtype=torch.int32, device=dev)
        row_base[:n] = packed.row_ptr.to(dev)[:n]
        return TileLayout(
            qweight=packed.qweight.to(dev), sz=torch.zeros(0, dtype=torch.int32, device=dev),
            meta=meta.to(torch.int32).contiguous(), kt_start=torch.zeros(n_kt + 1, dtype=torch.int32, device=dev),
            shape=(int(n), int(k)), bits=int(packed.bits), group_size=int(g), float_zeros=bool(packed.float_zeros),
            nnz=int(nnz), block_k=int(block_k), version=CANONICAL_VERSION, scales_c=packed.scales.to(dev),
            zeros_c=packed.zeros.to(dev), row_base=row_base)
    meta = (first << 8) | mask.reshape(n_kt, n_pad).to(torch.int64)
    qweight = _plane_order(packed.qweight.to(dev)[perm], int(packed.bits), int(g)).contiguous()
    return TileLayout(
        qweight=qweight,
        sz=_pack_sz(packed.scales.to(dev)[perm], packed.zeros.to(dev)[perm], bool(packed.float_zeros)).contiguous(),
        meta=meta.to(torch.int32).contiguous(),
        kt_start=kt_start.to(torch.int32),
        shape=(int(n), int(k)), bits=int(packed.bits), group_size=int(g), float_zeros=bool(packed.float_zeros),
        nnz=int(nnz), block_k=int(block_k),
    )


def to_packed(layout: TileLayout) -> PackedLinear:
    """The canonical packed layer back from a layout (inverse of :func:`build_tile_layout`; tests)."""
    n, k = layout.shape
    dev = layout.device
    if layout.canonical:  # the groups are in canonical order already
        kt_groups = layout.groups_per_ktile
        m = layout.mask.to(torch.int64)[:, :n]  # [kt, n]
        bits = (m.t()[..., None] >> torch.arange(kt_groups, device=dev)) & 1  # [n, kt, j]: row-major order
        row_i, kt_i, j_i = torch.nonzero(bits, as_tuple=True)
        counts = torch.bincount(row_i, minlength=n)[:n]
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        row_ptr[1:] = torch.cumsum(counts, 0)
        return PackedLinear(row_ptr=row_ptr.to(torch.int32), col_idx=(kt_i * kt_groups + j_i).to(torch.int16),
                            qweight=layout.qweight, scales=layout.scales_c, zeros=layout.zeros_c, shape=(n, k),
                            bits=layout.bits, group_size=layout.group_size)
    kt_groups = layout.groups_per_ktile
    n_rb = layout.n_row_blocks
    n_pad = n_rb * ROW_BLOCK
    m = layout.mask.to(torch.int64).reshape(layout.n_ktiles, n_pad)
    bits = (m[..., None] >> torch.arange(kt_groups, device=dev)) & 1  # [kt, n_pad, j]
    kt_i, row_i, j_i = torch.nonzero(bits, as_tuple=True)  # sorted by (kt, row, j) == chunk order
    col = kt_i * kt_groups + j_i
    order = torch.argsort(row_i * (layout.n_ktiles * kt_groups) + col, stable=True)
    rows = row_i[order]
    counts = torch.bincount(rows, minlength=n)[:n]
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return PackedLinear(row_ptr=row_ptr.to(torch.int32), col_idx=col[order].to(torch.int16).contiguous(),
                        qweight=_plane_order(layout.qweight, layout.bits, layout.group_size, inverse=True)[order]
                        .contiguous(), scales=layout.scales[order].contiguous(),
                        zeros=layout.zeros[order].contiguous(), shape=(n, k), bits=layout.bits,
                        group_size=layout.group_size)
