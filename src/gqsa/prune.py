"""Group saliency, group-mask selection, and one-shot group pruning + quantization of one layer.

Weights are viewed as groups: ``W[N, K]`` → ``[N, C, G]`` with ``C = ceil(K / G)``; a padded last
group carries zeros that never count (``valid`` marks the real elements).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import quant


@dataclass
class CompressedWeight:
    """One layer's result: integer codes ``[N, C, G]``, ``scale``/``zero``/``mask`` ``[N, C]`` and the
    dequantized, masked weight ``weight`` ``[N, K]`` (float32), which the packed form reproduces
    exactly."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor


def group_view(w: torch.Tensor, group_size: int):
    """``[N, K]`` → (``[N, C, G]`` zero-padded, ``valid`` ``[C, G]`` bool)."""
    n, k = w.shape
    c = math.ceil(k / group_size)
    pad = c * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    valid = (torch.arange(c * group_size, device=w.device) < k).reshape(c, group_size)
    return w.reshape(n, c, group_size), valid


def saliency(w: torch.Tensor, group_size: int, method: str, hessian: torch.Tensor | None = None,
             damp: float = 0.01) -> torch.Tensor:
    """Importance of every group ``[N, C]`` (higher = keep).

    ``magnitude``: Σ|W| over the group; ``wanda``: Σ|W|·‖X_col‖₂ (‖X_col‖₂ = √diag(XᵀX));
    ``hessian``: the group OBS error ``w_gᵀ ([H⁻¹]_gg)⁻¹ w_g`` — the growth of the layer's squared
    output error when the group is removed and the rest of the row optimally compensates.
    """
    wg, _ = group_view(w.float(), group_size)
    if method == "magnitude":
        return wg.abs().sum(-1)
    if hessian is None:
        raise ValueError(f"'{method}' saliency needs calibration statistics (the layer's XᵀX)")
    if method == "wanda":
        norms, _ = group_view(hessian.diagonal().clamp(min=0).sqrt()[None, :], group_size)
        return (wg.abs() * norms).sum(-1)
    if method == "hessian":
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(_prepare_hessian(hessian, group_size, damp)))
        c = wg.shape[1]
        blocks = hinv.reshape(c, group_size, c, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return torch.einsum("ncg,cgh,nch->nc", wg, torch.linalg.inv(blocks), wg)
    raise ValueError(f"unknown saliency '{method}': use magnitude, wanda or hessian")


def select_mask(score: torch.Tensor, sparsity: float, allocation: str = "row") -> torch.Tensor:
    """Keep the highest-scoring groups: ``row`` keeps ``round((1−S)·C)`` groups in every row,
    ``layer`` keeps ``round((1−S)·N·C)`` groups anywhere in the layer (at least one per layer)."""
    n, c = score.shape
    if allocation == "row":
        keep = min(c, max(1, round((1 - sparsity) * c)))
        idx = score.topk(keep, dim=1).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    if allocation == "layer":
        keep = min(n * c, max(1, round((1 - sparsity) * n * c)))
        idx = score.flatten().topk(keep).indices
        return torch.zeros(n * c, dtype=torch.bool, device=score.device).scatter_(0, idx, True).reshape(n, c)
    raise ValueError(f"unknown allocation '{allocation}': use row or layer")


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``H⁻¹`` (``H`` positive definite): the row-by-row form of the
    inverse Hessian that GPTQ/SparseGPT-style column updates use."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _prepare_hessian(h: torch.Tensor, group_size: int, damp: float) -> torch.Tensor:
    """Pad ``H`` ``[K, K]`` to ``[C·G, C·G]`` and make it positive definite (dead inputs, padding and
    dampening get a unit/damped diagonal)."""
    k = h.shape[0]
    kp = math.ceil(k / group_size) * group_size
    hp = torch.zeros(kp, kp, dtype=torch.float32, device=h.device)
    hp[:k, :k] = h.float()
    diag = hp.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * diag[~dead].mean() if bool((~dead).any()) else damp
    return hp


def compress_rtn(w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int, init: str = "mse",
                 hessian: torch.Tensor | None = None) -> CompressedWeight:
    """Quantize the kept groups to the nearest level (with the ``init`` range search; the squared
    error is weighted by the input energy ``diag(XᵀX)`` when ``hessian`` is given)."""
    n, k = w.shape
    wg, valid = group_view(w.float(), group_size)
    importance = None
    if hessian is not None:
        importance, _ = group_view(hessian.diagonal().float().clamp(min=0)[None, :], group_size)
    scale, zero = quant.init_params(wg, bits, init, valid=valid, importance=importance)
    codes = quant.quantize(wg, scale, zero, bits)
    deq = quant.dequantize(codes, scale, zero) * mask[..., None]
    return CompressedWeight(codes, scale, zero, mask, deq.reshape(n, -1)[:, :k])


def compress_obs(w: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int,
                 init: str = "mse", damp: float = 0.01, blocksize: int = 128) -> CompressedWeight:
    """Prune the masked-out groups and quantize the kept ones column by column, spreading each
    column's error over the columns not yet processed through the inverse Hessian (SparseGPT's
    joint prune+quantize loop, GPTQ's lazy block updates), with the group mask held fixed.

    A group's scale and zero point are set when the loop reaches its first column, from the weights
    as compensated so far.
    """
    n, k = w.shape
    g = group_size
    wg, valid = group_view(w.float(), g)
    c = wg.shape[1]
    kp = c * g
    W = wg.reshape(n, kp).clone()
    H = _prepare_hessian(hessian, g, damp)
    dead = hessian.diagonal()[:k] <= 0
    W[:, :k][:, dead] = 0
    importance = H.diagonal().clone()
    hinv = upper_cholesky_of_inverse(H)
    colmask = mask.repeat_interleave(g, dim=1).float()
    codes, out = torch.zeros(n, kp, device=w.device), torch.zeros(n, kp, device=w.device)
    scale, zero = torch.zeros(n, c, device=w.device), torch.zeros(n, c, device=w.device)
    bs = max(g, blocksize // g * g)
    for i1 in range(0, kp, bs):
        i2 = min(i1 + bs, kp)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                gi = col // g
                s, z = quant.init_params(w1[:, i:i + g], bits, init, valid=valid[gi],
                                         importance=importance[col:col + g])
                scale[:, gi], zero[:, gi] = s, z
            s, z = scale[:, col // g], zero[:, col // g]
            q = quant.quantize(w1[:, i:i + 1], s, z, bits)[:, 0]
            deq = quant.dequantize(q[:, None], s, z)[:, 0] * colmask[:, col]
            codes[:, col] = q
            out[:, col] = deq
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return CompressedWeight(codes.reshape(n, c, g), scale, zero, mask, out[:, :k].clone())


def compress_weight(w: torch.Tensor, bits: int, group_size: int, sparsity: float, saliency_method: str,
                    allocation: str = "row", init: str = "mse", hessian: torch.Tensor | None = None,
                    damp: float = 0.01) -> CompressedWeight:
    """One-shot GQSA of one weight matrix: rank groups, fix the mask, quantize what is kept."""
    if w.numel() == 0:
        raise ValueError(f"cannot compress an empty weight of shape {list(w.shape)}")
    score = saliency(w, group_size, saliency_method, hessian, damp)
    mask = select_mask(score, sparsity, allocation) if sparsity > 0 else torch.ones_like(score, dtype=torch.bool)
    if saliency_method == "hessian":
        return compress_obs(w, hessian, mask, bits, group_size, init, damp)
    return compress_rtn(w, mask, bits, group_size, init, hessian)
