"""Load-time layout of a block-uniform 4-bit layer for the hand-written tensor-core kernel
(``mma_block.cu``, launcher :mod:`gqsa.kernels.mma_gemm`): layout version ``MMA_LAYOUT_VERSION`` (1),
built from a :class:`~gqsa.kernels.block_layout.BlockLayout` (so from the canonical checkpoint, which does
not change).

The kernel computes, per row block of R rows (one warp per 16-row *m-tile*) and per *step* of 16 input
features, one ``mma.sync.m16n8k16`` per 8 tokens with the weights as the A operand. A kept group of G
features is ``G/16`` consecutive steps; a block's steps are padded to a multiple of 4 and cut into *quads*
of 4 steps, the unit of one 16-byte load per lane:

* ``qw`` int32 ``[n_quads, R/16, 32, 4]``: ``qw[q, w, lane, i]`` is the A fragment of m-tile ``w`` at step
  ``4q + i`` for ``lane``: 8 nibbles, nibble ``j`` the code of tile row ``g + 8·(j&1)`` and tile column
  ``2t + 8·((j>>1)&1) + (j>>2)`` (``g = lane // 4``, ``t = lane % 4``) — the order of the fragment's
  registers, so ``(word >> 4j) & 0x000F000F`` holds both codes of register ``j``;
* ``kofs`` int32 ``[n_quads, 4]``: the step's first feature / 2;
* ``sz`` int32 ``[n_slots, R/16, 8, 2]``: the block layout's ``scale | zero << 16`` words, per m-tile the
  rows ``g`` and ``g + 8`` side by side (one 8-byte load per lane and kept group); slot = step // (G/16);
* ``qptr`` int32 ``[n_blocks + 1]``: the quads of row block ``b``;
* ``row_map``: the block layout's (clusterR), or None.

Padding steps (to fill a block's last quad) have codes 0 and scale 0 — weight 0 — and repeat the block's
last real column (valid memory, no predicate in the kernel). Layers whose K is not a multiple of G need the
kernel's ``EDGE`` variant (features past K read as 0). Every code, scale and zero point is the canonical one,
only permuted: :func:`dequantize` (pure torch) equals :func:`gqsa.kernels.reference.dequantize` bit for bit
(tests), and :func:`linear` is the kernel's twin, step by step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_layout import BlockLayout

MMA_LAYOUT_VERSION = 1
STEP = 16  # features per mma step (the k of m16n8k16)
QUAD = 4  # steps per 16-byte load of a lane
BUILD_CHUNK = 1 << 22  # codes repacked at a time (the int64 temporaries: 8 bytes a code)

# nibble j of a lane's word: its row and column in the 16×16 tile, for lane (g, t)
_J = torch.arange(8)
_LANE = torch.arange(32)
_ROWS = (_LANE[:, None] // 4) + 8 * (_J[None, :] & 1)  # [32, 8]
_COLS = 2 * (_LANE[:, None] % 4) + 8 * ((_J[None, :] >> 1) & 1) + (_J[None, :] >> 2)  # [32, 8]


@dataclass
class MmaLayout:
    """A block-uniform 4-bit layer in the order of ``mma_block.cu`` (see the module docstring)."""

    qw: torch.Tensor  # int32 [n_quads, R/16, 32, 4]
    kofs: torch.Tensor  # int32 [n_quads, 4]
    sz: torch.Tensor  # int32 [n_slots, R/16, 8, 2]
    qptr: torch.Tensor  # int32 [n_blocks + 1]
    shape: tuple[int, int]
    rows: int
    group_size: int
    max_quads: int  # most quads of any block
    row_map: torch.Tensor | None = None
    version: int = MMA_LAYOUT_VERSION
    uniform_quads: int = 0  # quads of every block where all blocks have the same number (> 0), else 0

    @property
    def n_blocks(self) -> int:
        return self.qptr.numel() - 1

    @property
    def n_quads(self) -> int:
        return self.qw.shape[0]

    @property
    def edge(self) -> bool:
        """Whether the kernel's ``EDGE`` variant is needed (K not a multiple of G)."""
        return self.shape[1] % self.group_size != 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.kofs, self.sz, self.qptr))


def unsupported(layout: BlockLayout) -> str | None:
    """Why ``layout`` cannot take the hand-written kernel (None: it can)."""
    if layout.bits != 4:
        return f"{layout.bits}-bit codes (the kernel reads 4-bit codes)"
    if layout.float_zeros:
        return "float zero points"
    if layout.group_size % STEP:
        return f"group size {layout.group_size} (a multiple of {STEP} is needed)"
    if layout.shape[1] % 8:
        return f"{layout.shape[1]} input features (the kernel copies x 8 features at a time: a multiple of 8 is needed)"
    return None


def build_mma_layout(layout: BlockLayout) -> MmaLayout:
    """Repack ``layout`` for ``mma_block.cu``; ``ValueError`` when :func:`unsupported` says why not."""
    why = unsupported(layout)
    if why is not None:
        raise ValueError(f"the hand-written tensor-core kernel cannot take this layer: {why}")
    dev = layout.device
    r, g = layout.rows, layout.group_size
    sub = g // STEP  # steps per kept group
    spq = max(1, QUAD // sub)  # kept groups per quad (G = 16: 4, G = 32: 2, G ≥ 64: one group = 1+ quads)
    nb = layout.n_blocks
    bp = layout.block_ptr.to(torch.int64)
    real = layout.cols >= 0
    # the block layout pads its blocks at the end: the first `count` slots of a block are real
    blk_of = torch.repeat_interleave(torch.arange(nb, device=dev), bp[1:] - bp[:-1], output_size=layout.n_slots)
    count = torch.bincount(blk_of[real], minlength=nb) if layout.n_slots else torch.zeros(nb, dtype=torch.int64,
                                                                                          device=dev)
    padded = -(-count // spq) * spq
    nptr = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
    nptr[1:] = torch.cumsum(padded, 0)
    t_all = int(nptr[-1])
    nblk = torch.repeat_interleave(torch.arange(nb, device=dev), padded, output_size=t_all)
    j = torch.arange(t_all, device=dev) - nptr[nblk]  # slot index inside its block
    is_real = j < count[nblk]
    # padding slots repeat the block's last real slot's column (weights 0): a valid read, no predicate
    src = bp[nblk] + torch.minimum(j, (count[nblk] - 1).clamp(min=0))
    sz = torch.where(is_real[:, None], layout.sz[src], 0) if t_all else torch.zeros(0, r, dtype=torch.int32,
                                                                                    device=dev)
    cols = layout.cols[src].to(torch.int64) if t_all else torch.zeros(0, dtype=torch.int64, device=dev)
    steps = t_all * sub
    quads = steps // QUAD
    qw = torch.empty(quads, r // 16, 32, QUAD, dtype=torch.int32, device=dev)
    # the codes in chunks of slots (whole quads), so that the temporaries stay near BUILD_CHUNK codes
    chunk = max(QUAD, BUILD_CHUNK // (r * g) // QUAD * QUAD)
    for t0 in range(0, t_all, chunk):
        t1 = min(t_all, t0 + chunk)
        qw[t0 * sub // QUAD:t1 * sub // QUAD] = _fragment_words(layout, src[t0:t1], is_real[t0:t1])
    kofs = (cols[:, None] * g + STEP * torch.arange(sub, device=dev)[None, :]).reshape(-1) // 2
    kofs = kofs.reshape(quads, QUAD).to(torch.int32).contiguous()
    sz4 = sz.reshape(t_all, r // 16, 2, 8).permute(0, 1, 3, 2).contiguous()
    qptr = (nptr * sub // QUAD).to(torch.int32)
    per_block = padded * sub // QUAD
    max_q = int(per_block.max()) if nb else 0
    # row-balanced block masks keep the same groups count in every block: the kernel then finds a block's quads at
    # block · uniform_quads instead of loading qptr before its first copies
    uq = max_q if nb and max_q and bool((per_block == max_q).all()) else 0
    return MmaLayout(qw=qw, kofs=kofs, sz=sz4, qptr=qptr, shape=layout.shape, rows=r, group_size=g,
                     max_quads=max_q, row_map=layout.row_map, uniform_quads=uq)


def _fragment_words(layout: BlockLayout, src: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The ``[quads, R/16, 32, 4]`` fragment words of the slots ``src`` of ``layout`` (a whole number of quads;
    slots with ``real`` False get codes 0)."""
    r, g, bits = layout.rows, layout.group_size, layout.bits
    dev = layout.device
    sub = g // STEP
    cpb = 8 // bits
    # slot s sits at bits (s % cpb)·bits of byte tile s // cpb (uint8 all along)
    shift = ((src % cpb) * bits).to(torch.uint8)[:, None, None]
    codes = (layout.qweight[src // cpb] >> shift) & ((1 << bits) - 1)  # [T, R, G] uint8
    codes = torch.where(real[:, None, None], codes, 0)
    t = src.numel()
    steps = t * sub
    tiles = codes.reshape(t, r // 16, 16, sub, STEP).permute(0, 3, 1, 2, 4).reshape(steps, r // 16, 16, STEP)
    nib = tiles[:, :, _ROWS.to(dev), _COLS.to(dev)].to(torch.int64)  # [S, R/16, 32, 8]: each lane's 8 nibbles
    word = (nib << (4 * torch.arange(8, device=dev))).sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.reshape(steps // QUAD, QUAD, r // 16, 32).permute(0, 2, 3, 1)


def _step_weights(ml: MmaLayout, dtype: torch.dtype) -> torch.Tensor:
    """The ``[S, R, 16]`` weight tile of every step, decoded the kernel's way: nibbles from the fragment
    words, ``((1024 + q) − (1024 + z)) · s`` rounded to ``dtype`` (exact before the product)."""
    r = ml.rows
    sub = ml.group_size // STEP
    dev = ml.qw.device
    word = ml.qw.permute(0, 3, 1, 2).reshape(-1, r // 16, 32).to(torch.int64) & 0xFFFFFFFF  # [S, R/16, 32]
    nib = (word[..., None] >> (4 * torch.arange(8, device=dev))) & 0xF  # [S, R/16, 32, 8]
    s_steps = nib.shape[0]
    tiles = torch.zeros(s_steps, r // 16, 16, STEP, dtype=torch.int64, device=dev)
    tiles[:, :, _ROWS.to(dev), _COLS.to(dev)] = nib
    szw = ml.sz.permute(0, 1, 3, 2).reshape(-1, r)  # [T, R]
    szw = szw.repeat_interleave(sub, 0) if s_steps else szw  # per step
    scale = (szw & 0xFFFF).to(torch.int16).view(torch.float16).float()
    zero = ((szw >> 16) & 0xFFFF).float()
    w = (tiles.reshape(s_steps, r, STEP).float() - zero[..., None]) * scale[..., None]
    return w.to(dtype)


def dequantize(ml: MmaLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight from an :class:`MmaLayout` (pure torch; tests)."""
    n, k = ml.shape
    r = ml.rows
    dev = ml.qw.device
    w = _step_weights(ml, torch.float32)  # [S, R, 16]
    qp = ml.qptr.to(torch.int64)
    blk = torch.repeat_interleave(torch.arange(ml.n_blocks, device=dev), (qp[1:] - qp[:-1]) * QUAD,
                                  output_size=ml.n_quads * QUAD)
    kpad = -(-k // ml.group_size) * ml.group_size
    dense = torch.zeros(ml.n_blocks, r, kpad, dtype=torch.float32, device=dev)
    feat = ml.kofs.reshape(-1).to(torch.int64) * 2
    idx = feat[:, None] + torch.arange(STEP, device=dev)  # [S, 16]
    # padding steps add zeros on a real column: an add, not an assignment
    dense.index_put_((blk[:, None, None], torch.arange(r, device=dev)[None, :, None], idx[:, None, :]), w,
                     accumulate=True)
    dense = dense.reshape(ml.n_blocks * r, kpad)
    if ml.row_map is not None:
        out = torch.zeros(n, kpad, dtype=torch.float32, device=dev)
        keep = ml.row_map >= 0
        out[ml.row_map[keep].long()] = dense[keep]
        dense = out
    return dense[:n, :k].to(dtype)


def linear(x: torch.Tensor, ml: MmaLayout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's twin in pure torch: ``y = x @ Ŵᵀ (+ bias)`` step by step over the layout (each step's
    weights rounded to x's dtype as the kernel does, products summed in float32), in x's dtype."""
    n, k = ml.shape
    r = ml.rows
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    dev = x.device
    w = _step_weights(ml, x.dtype).float()  # [S, R, 16]
    feat = ml.kofs.reshape(-1).to(torch.int64) * 2
    idx = feat[:, None] + torch.arange(STEP, device=dev)  # [S, 16]
    xs = torch.zeros(m, k + ml.group_size, dtype=torch.float32, device=dev)
    xs[:, :k] = x2.float()  # features past K read as 0 (the kernel's EDGE variant)
    xg = xs[:, idx]  # [M, S, 16]
    part = torch.einsum("srk,msk->msr", w, xg)  # [M, S, R]
    qp = ml.qptr.to(torch.int64)
    blk = torch.repeat_interleave(torch.arange(ml.n_blocks, device=dev), (qp[1:] - qp[:-1]) * QUAD,
                                  output_size=ml.n_quads * QUAD)
    acc = torch.zeros(m, ml.n_blocks, r, dtype=torch.float32, device=dev)
    acc.index_add_(1, blk, part)
    acc = acc.reshape(m, ml.n_blocks * r)
    if ml.row_map is not None:
        y = torch.zeros(m, n, dtype=torch.float32, device=dev)
        keep = ml.row_map >= 0
        y[:, ml.row_map[keep].long()] = acc[:, keep]
    else:
        y = acc[:, :n]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
