"""RTN: round-to-nearest per-group asymmetric quantization (the baseline of GPTQ, Frantar et al.
2022, §5): each group of ``G`` input weights gets a min-max scale and integer zero point, every
weight goes to its nearest level. Nothing is calibrated."""
from __future__ import annotations

import torch

from .. import prune


def rtn_layer(w: torch.Tensor, bits: int, group_size: int, init: str = "minmax",
              hessian: torch.Tensor | None = None) -> prune.CompressedWeight:
    """Quantize ``w`` ``[N, K]`` group by group. ``init="minmax"`` is the paper's RTN; ``"mse"`` adds
    the clipping search (weighted by ``diag(hessian)`` when given)."""
    n, k = w.shape
    c = -(-k // group_size)
    mask = torch.ones(n, c, dtype=torch.bool, device=w.device)
    return prune.compress_rtn(w, mask, bits, group_size, init, hessian)
