"""Pure-torch execution of a packed GQSA layer (any device, CPU included): the ground truth that
the fused kernels are tested against."""
from __future__ import annotations

import torch

from .. import quant
from ..format import PackedLinear


def dequantize(p: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight of a packed layer; pruned groups are exactly zero.

    Dequantization happens in float32 (``s · (q − z)``, the formula of :func:`gqsa.quant.dequantize`)
    and is cast to ``dtype`` last, so it equals the float32 fake-quantized weight bit for bit.
    """
    n, k = p.shape
    g = p.group_size
    codes = quant.unpack_codes(p.qweight, p.bits, g)
    w = quant.dequantize(codes, p.scales.float(), p.zeros.float())  # [nnz, G]
    rows = torch.repeat_interleave(
        torch.arange(n, device=w.device), (p.row_ptr[1:] - p.row_ptr[:-1]).long(), output_size=p.nnz
    )
    dense = torch.zeros(n, p.n_group_cols, g, dtype=torch.float32, device=w.device)
    dense[rows, p.col_idx.long()] = w
    return dense.reshape(n, -1)[:, :k].to(dtype)


def linear(x: torch.Tensor, p: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(p)ᵀ (+ bias)`` in the dtype of ``x``."""
    return torch.nn.functional.linear(x, dequantize(p, x.dtype), bias)
