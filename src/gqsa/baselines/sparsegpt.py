"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", 2023), Algorithm 1: prune a layer column by column; each removed weight's error is
compensated on the columns not yet processed through the Cholesky factor of ``H⁻¹ = (XᵀX + λI)⁻¹``
(the OBS update restricted to the remaining columns), with lazy block updates. The mask is chosen
adaptively from the compensated weights with the OBS score ``w² / [H⁻¹]²_jj``: per block of
``blocksize`` columns for unstructured sparsity (over the whole layer's rows in that block), and per
``m`` columns for ``n:m``. Kept values stay full precision (rounded to fp16 by the caller), or with
``bits`` are quantized in the same sweep (the paper's joint sparsification + quantization, §3.5: the
2:4 + int4 format that Sparse-Marlin serves): one scale and integer zero point per ``group_size``
consecutive inputs of a row, set from the compensated weights when the sweep reaches the group
(as the reference code does), each column's pruning or rounding error compensated alike.
"""
from __future__ import annotations

import torch

from .. import obs, prune, quant


def sparsegpt_layer(w: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    pattern: tuple[int, int] | None = (2, 4), damp: float = 0.01, blocksize: int = 128,
                    mask: torch.Tensor | None = None, bits: int | None = None, group_size: int = 128,
                    init: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(pruned weight [N, K] float32 with exact zeros, kept mask [N, K] bool)``.

    ``pattern=(n, m)`` keeps ``n`` of every ``m`` consecutive weights of a row; ``None`` removes a
    ``sparsity`` fraction, chosen per ``blocksize`` columns. ``mask`` (kept = True) fixes the mask
    instead (then only the compensation runs). ``bits``: also quantize the kept weights (groups of
    ``group_size`` inputs; ``init`` = ``minmax`` or ``mse``); the returned weight is then dequantized.
    """
    n_rows, k = w.shape
    W = w.float().clone()
    H = hessian.float().clone()
    dead = H.diagonal() <= 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    hinv = prune.upper_cholesky_of_inverse(H)
    if pattern is not None:
        n_keep, m = pattern
        bs = max(m, blocksize // m * m)  # n:m blocks never straddle two lazy blocks
    else:
        bs = blocksize
    if bits is not None:
        quant.check_bits(bits)
        if pattern is not None and group_size % pattern[1]:
            raise ValueError(f"quantization groups of {group_size} do not hold whole {pattern[0]}:{pattern[1]} blocks")
        bs = max(group_size, bs // group_size * group_size)  # groups never straddle two lazy blocks
    keep = torch.ones(n_rows, k, dtype=torch.bool, device=w.device)
    state = {}

    def block(i1, i2, w1, h1):
        state["q1"] = torch.zeros_like(w1)
        state["d"] = d = h1.diagonal()
        if mask is not None:
            prune1 = ~mask[:, i1:i2]
        elif pattern is None:
            score = w1.square() / d[None, :].square()
            drop = int(score.numel() * sparsity)
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
            if drop:
                prune1.view(-1)[score.flatten().topk(drop, largest=False).indices] = True
        else:
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        state["prune1"] = prune1

    def column(c, i, w1):
        prune1, d = state["prune1"], state["d"]
        if mask is None and pattern is not None and i % m == 0:
            j = min(i + m, w1.shape[1])
            score = w1[:, i:j].square() / d[None, i:j].square()
            n_drop = max(0, (j - i) - n_keep)
            if n_drop:
                prune1[:, i:j].scatter_(1, score.topk(n_drop, dim=1, largest=False).indices, True)
        col = w1[:, i]
        if bits is not None:
            if c % group_size == 0:
                state["scale"], state["zero"] = quant.init_params(w1[:, i:i + group_size], bits, init)
            scale, zero = state["scale"], state["zero"]
            kept = quant.dequantize(quant.quantize(col[:, None], scale, zero, bits), scale, zero)[:, 0]
        else:
            kept = col
        q = torch.where(prune1[:, i], torch.zeros_like(col), kept)
        state["q1"][:, i] = q
        return q

    def done(i1, i2, w1):
        W[:, i1:i2] = state["q1"]
        keep[:, i1:i2] = ~state["prune1"]

    obs.sweep(W, hinv, bs, column, block, done)
    return W, keep
