"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022), Algorithm 1: quantize a layer column by column, each column's rounding error
spread over the columns not yet quantized through the Cholesky factor of the inverse Hessian
``H⁻¹ = (XᵀX + λI)⁻¹``, with lazy block updates of ``blocksize`` columns.

Grouping: one scale and integer zero point per ``G`` consecutive input weights of a row. Without
act-order, a group's parameters are set when the loop reaches its first column, from the weights
as compensated so far (the paper's code) — this is exactly :func:`gqsa.prune.compress_obs` with
every group kept, so that is what runs. With ``act_order`` (columns processed in order of
decreasing ``diag(H)``, the reference code's ``--act-order``) the groups stay contiguous in the
original column order, as the packed format stores them, so their parameters are fixed up front
from the unquantized weights ("static groups", as AutoGPTQ does); every column uses its own
group's parameters whenever the loop reaches it.
"""
from __future__ import annotations

import torch

from .. import obs, prune, quant


def gptq_layer(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, act_order: bool = False,
               init: str = "minmax", damp: float = 0.01, blocksize: int = 128) -> prune.CompressedWeight:
    """GPTQ of ``w`` ``[N, K]`` with ``hessian`` = ``XᵀX/n`` ``[K, K]`` of its calibration inputs.

    ``init="minmax"`` is the paper's quantizer grid; ``"mse"`` adds a clipping search.
    ``damp``: λ as a fraction of the mean diagonal (the paper's 1%).
    """
    n, k = w.shape
    g = group_size
    c = -(-k // g)
    ones = torch.ones(n, c, dtype=torch.bool, device=w.device)
    if not act_order:
        return prune.compress_obs(w, hessian, ones, bits, g, init, damp, blocksize)
    wg, valid = prune.group_view(w.float(), g)
    kp = c * g
    W = wg.reshape(n, kp).clone()
    H = prune.prepare_hessian(hessian, g, damp)
    dead = hessian.diagonal()[:k] <= 0
    W[:, :k][:, dead] = 0
    importance = H.diagonal().clone()
    scale, zero = quant.init_params(W.reshape(n, c, g), bits, init, valid=valid, importance=importance.reshape(c, g))
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    W = W[:, perm]
    H = H[perm][:, perm]
    hinv = prune.upper_cholesky_of_inverse(H)
    group_of = (perm // g).tolist()
    codes, out = torch.zeros_like(W), torch.zeros_like(W)

    def column(col, i, w1):
        gi = group_of[col]
        s, z = scale[:, gi], zero[:, gi]
        q = quant.quantize(w1[:, i:i + 1], s, z, bits)[:, 0]
        deq = quant.dequantize(q[:, None], s, z)[:, 0]
        codes[:, col], out[:, col] = q, deq
        return deq

    obs.sweep(W, hinv, max(1, blocksize), column)
    inv = torch.argsort(perm)
    codes, out = codes[:, inv], out[:, inv]
    return prune.CompressedWeight(codes.reshape(n, c, g), scale, zero, ones, out[:, :k].clone())
