"""The column-by-column OBS sweep that GPTQ, SparseGPT and GQSA's one-shot step share: each column is replaced
(quantized, pruned, or both) and its error spread over the columns not yet processed through the upper
Cholesky factor of ``H⁻¹``, with lazy updates of the later columns once per block."""
from __future__ import annotations

from collections.abc import Callable

import torch


def sweep(W: torch.Tensor, hinv: torch.Tensor, blocksize: int,
          column: Callable[[int, int, torch.Tensor], torch.Tensor],
          block: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
          done: Callable[[int, int, torch.Tensor], None] | None = None) -> None:
    """Sweep the columns of ``W`` ``[N, K]`` (changed in place: the later columns get the compensation).

    Per lazy block ``[i1, i2)`` of ``blocksize`` columns: ``block(i1, i2, w1, h1)`` first (``w1`` the block's
    weights as compensated so far, ``h1`` its square of ``hinv``), then for each column ``i`` of it
    ``column(i1 + i, i, w1)`` returns the value the column takes, and the error ``(w1[:, i] − value) / h1[i, i]``
    is subtracted along ``h1[i, i:]``; ``done(i1, i2, w1)`` then sees the finished block, and the block's
    errors update the columns after it: ``W[:, i2:] −= E · hinv[i1:i2, i2:]``.
    """
    k = W.shape[1]
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        if block is not None:
            block(i1, i2, w1, h1)
        for i in range(i2 - i1):
            value = column(i1 + i, i, w1)
            e = (w1[:, i] - value) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        if done is not None:
            done(i1, i2, w1)
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
