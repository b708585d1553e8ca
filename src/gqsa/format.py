"""The packed Block-Sparse-Row (BSR) layout of one GQSA linear layer, and its validation.

| tensor  | dtype           | shape           | meaning                                           |
|---------|-----------------|-----------------|---------------------------------------------------|
| row_ptr | int32           | [N+1]           | kept groups of row n are row_ptr[n]:row_ptr[n+1]  |
| col_idx | int16           | [nnz]           | group column, ascending within a row              |
| qweight | uint8           | [nnz, G·b/8]    | codes, little-endian bit stream                   |
| scales  | float16         | [nnz]           | s                                                 |
| zeros   | uint8 / float16 | [nnz]           | z (integer by default, float after E2E on z)      |

``K`` need not be a multiple of ``G``: the last group column is padded; its padding codes equal the
rounded zero point (exactly 0 after dequantization with integer zeros) and are never multiplied
with real inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import quant

TENSOR_NAMES = ("row_ptr", "col_idx", "qweight", "scales", "zeros")


class FormatError(ValueError):
    """A packed layer or checkpoint is malformed; the message names the tensor and the problem."""


@dataclass
class PackedLinear:
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    bits: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def n_group_cols(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def float_zeros(self) -> bool:
        return self.zeros.dtype == torch.float16

    @property
    def sparsity(self) -> float:
        """Fraction of the ``N·K`` original weights removed (padding of kept groups not counted)."""
        n, k = self.shape
        g = self.group_size
        kept = self.nnz * g
        if k % g:  # kept groups in the padded last column hold only k % g real weights
            kept -= int((self.col_idx == self.n_group_cols - 1).sum()) * (g - k % g)
        return 1.0 - kept / (n * k)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        """Storage bits per original weight: ``8·bytes / (N·K)`` (DESIGN.md's formula, measured)."""
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])

    @classmethod
    def from_tensors(cls, tensors: dict, name: str, shape, bits: int, group_size: int) -> "PackedLinear":
        """Layer ``name`` of a flat ``{"<name>.<tensor>": tensor}`` dict (a safetensors file's), unchecked."""
        return cls(**{t: tensors[f"{name}.{t}"] for t in TENSOR_NAMES}, shape=tuple(shape), bits=bits,
                   group_size=group_size)

    def group_rows(self) -> torch.Tensor:
        """The row of each kept group, ``[nnz]`` int64 (``row_ptr`` expanded)."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts,
                                       output_size=self.nnz)

    def to(self, device) -> "PackedLinear":
        return PackedLinear(**{k: v.to(device) for k, v in self.tensors().items()},
                            shape=self.shape, bits=self.bits, group_size=self.group_size)

    def validate(self, name: str = "layer") -> None:
        validate(self.tensors(), self.shape, self.bits, self.group_size, name)


def design_bits_per_weight(sparsity: float, bits: int, group_size: int, k: int, float_zeros=False) -> float:
    """DESIGN.md: ``(1−S)·(b + (16+8+16)/G) + 32/K`` bits per original weight (integer zeros)."""
    zero_bits = 16 if float_zeros else 8
    return (1 - sparsity) * (bits + (16 + zero_bits + 16) / group_size) + 32 / k


def pack(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    mask: torch.Tensor,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    float_zeros: bool = False,
) -> PackedLinear:
    """Pack a group-quantized, group-pruned layer.

    ``codes``: ``[N, C, G]`` integer codes (C = ceil(K/G) group columns, padding included);
    ``scale``, ``zero``, ``mask``: ``[N, C]``. Groups where ``mask`` is False are dropped.
    """
    quant.check_bits(bits)
    n, k = shape
    if n <= 0 or k <= 0:
        raise FormatError(f"cannot pack a layer of shape {list(shape)}: both dimensions must be positive")
    c = math.ceil(k / group_size)
    if codes.shape != (n, c, group_size) or scale.shape != (n, c) or zero.shape != (n, c) or mask.shape != (n, c):
        raise FormatError(
            f"pack: expected codes [{n}, {c}, {group_size}] and scale/zero/mask [{n}, {c}], got "
            f"{list(codes.shape)}, {list(scale.shape)}, {list(zero.shape)}, {list(mask.shape)}"
        )
    if c > 32767:
        raise FormatError(f"K={k} with G={group_size} gives {c} group columns; int16 col_idx holds at most 32767")
    mask = mask.bool()
    if k % group_size:  # padding codes dequantize to 0
        codes = codes.clone()
        codes[:, -1, k % group_size:] = zero[:, -1:].round().clamp(0, quant.qmax(bits)).to(codes.dtype)
    counts = mask.sum(1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32, device=codes.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: ascending columns within a row
    if float_zeros:
        zeros = zero[rows, cols].to(torch.float16)
    else:
        zeros = zero[rows, cols].round().clamp(0, quant.qmax(bits)).to(torch.uint8)
    return PackedLinear(
        row_ptr=row_ptr,
        col_idx=cols.to(torch.int16),
        qweight=quant.pack_codes(codes[rows, cols], bits),
        scales=scale[rows, cols].to(torch.float16),
        zeros=zeros,
        shape=(n, k),
        bits=bits,
        group_size=group_size,
    )


def validate(tensors: dict[str, torch.Tensor], shape, bits: int, group_size: int, name: str = "layer") -> None:
    """Check everything a kernel relies on; raise :class:`FormatError` naming the first problem."""

    def fail(msg):
        raise FormatError(f"{name}: {msg}")

    if bits not in quant.SUPPORTED_BITS:
        fail(f"bits={bits} is not supported (use one of {quant.SUPPORTED_BITS})")
    if group_size not in quant.SUPPORTED_GROUP_SIZES:
        fail(f"group_size={group_size} is not supported (use one of {quant.SUPPORTED_GROUP_SIZES})")
    try:
        n, k = (int(v) for v in shape)
    except (TypeError, ValueError):
        fail(f"shape {shape!r} is not [out_features, in_features]")
    if n <= 0 or k <= 0:
        fail(f"shape [{n}, {k}] has an empty dimension")
    missing = [t for t in TENSOR_NAMES if t not in tensors]
    if missing:
        fail(f"missing tensor(s) {', '.join(missing)}")
    row_ptr, col_idx, qweight, scales, zeros = (tensors[t] for t in TENSOR_NAMES)
    for t, want in (("row_ptr", (torch.int32,)), ("col_idx", (torch.int16,)), ("qweight", (torch.uint8,)),
                    ("scales", (torch.float16,)), ("zeros", (torch.uint8, torch.float16))):
        if tensors[t].dtype not in want:
            fail(f"{t} has dtype {tensors[t].dtype}, expected {' or '.join(str(w) for w in want)}")
    c = math.ceil(k / group_size)
    if row_ptr.shape != (n + 1,):
        fail(f"row_ptr has shape {list(row_ptr.shape)}, expected [{n + 1}] for {n} rows")
    nnz = col_idx.numel()
    if col_idx.shape != (nnz,):
        fail(f"col_idx has shape {list(col_idx.shape)}, expected a vector")
    if qweight.shape != (nnz, group_size * bits // 8):
        fail(f"qweight has shape {list(qweight.shape)}, expected [{nnz}, {group_size * bits // 8}]")
    for t in ("scales", "zeros"):
        if tensors[t].shape != (nnz,):
            fail(f"{t} has shape {list(tensors[t].shape)}, expected [{nnz}]")
    rp = row_ptr.to(torch.int64)
    if int(rp[0]) != 0 or int(rp[-1]) != nnz:
        fail(f"row_ptr must start at 0 and end at nnz={nnz}, found {int(rp[0])} … {int(rp[-1])}")
    steps = rp[1:] - rp[:-1]
    if bool((steps < 0).any()):
        fail(f"row_ptr decreases at row {int((steps < 0).nonzero()[0])}")
    if bool((steps > c).any()):
        fail(f"row {int((steps > c).nonzero()[0])} holds more than the {c} group columns of K={k}")
    ci = col_idx.to(torch.int64)
    if nnz and (int(ci.min()) < 0 or int(ci.max()) >= c):
        fail(f"col_idx out of range [0, {c}): min {int(ci.min())}, max {int(ci.max())}")
    if nnz > 1:
        row_start = torch.zeros(nnz, dtype=torch.bool, device=ci.device)
        starts = rp[:-1][steps > 0]
        row_start[starts] = True
        rising = ci[1:] > ci[:-1]
        if not bool((rising | row_start[1:]).all()):
            bad = int((~(rising | row_start[1:])).nonzero()[0]) + 1
            fail(f"col_idx is not strictly ascending within its row at entry {bad}")
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        fail("scales must be finite and positive")
    if zeros.dtype == torch.uint8:
        if nnz and int(zeros.max()) > quant.qmax(bits):
            fail(f"integer zero point {int(zeros.max())} does not fit in {bits} bits")
    elif not bool(torch.isfinite(zeros).all()):
        fail("float zero points must be finite")
