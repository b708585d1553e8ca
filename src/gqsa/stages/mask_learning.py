"""Learnable group scores with a straight-through top-k mask during BQPO (``bqpo_learn_mask``).

Each trained linear (:class:`~gqsa.stages.trainable.FakeQuantLinear`) gets a score per (row, group). The
forward pass uses the hard mask of the highest scores, chosen by the run's allocation at the linear's own
sparsity (row-balanced under ``row``: exactly the target in every row); the backward pass gives each score
the gradient of its group's mask entry, ``Σ dL/dW · W`` over the group (a first-order estimate of the loss
change of removing — or adding back — the group). After each optimizer step of the learning epochs the mask
is chosen again from the scores; then the scores are frozen, and so is the mask.

Start: the one-shot mask (kept groups score in (0.25, 0.75), removed ones in (−0.75, −0.25), ordered inside
each class by the row-standardized log of the diagonal OBS saliency ``Σ w² · diag(XᵀX)`` of the uncompressed
weight), so training starts exactly at the one-shot result. Removed groups restart from the uncompressed
weights with their own min-max range (their one-shot codes hold the compensated remainder, about 0, whose
score gradient would be 0: they could never come back); their latent weights get no gradient while removed.
"""
from __future__ import annotations

import torch

from .. import prune, quant


@torch.no_grad()
def initial_scores(mask: torch.Tensor, dense: torch.Tensor, energy: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scores ``[N, C]`` whose top-k (any allocation) is ``mask``: ``±0.5`` by the mask plus ``0.25·tanh`` of
    the row-standardized log saliency ``Σ w² · diag(XᵀX)`` (``energy`` ``[C, G]``)."""
    wg, _ = prune.group_view(dense.float(), group_size)
    sal = torch.log((wg.square() * energy).sum(-1) + 1e-30)
    z = (sal - sal.mean(1, keepdim=True)) / sal.std(1, keepdim=True).clamp(min=1e-6)
    return torch.where(mask, 0.5, -0.5) + 0.25 * torch.tanh(z)


@torch.no_grad()
def start(m, dense: torch.Tensor, energy: torch.Tensor) -> None:
    """Give ``m`` its trainable scores and restart its removed groups from ``dense`` ``[N, K]``."""
    mask = m.mask[..., 0]
    wg, valid = prune.group_view(dense.float().to(m.u.device), m.group_size)
    s, z = quant.init_params(wg, m.bits, "minmax", valid=valid)
    s = quant.round_scale(s)
    removed = ~mask
    m.s0[removed] = s[removed]
    m.zero[removed] = z[removed].float()
    m.gamma[removed] = 1.0
    m.u[removed] = (wg / m.s0[..., None])[removed]
    m.sparsity = 1.0 - float(mask.float().mean())  # the linear's own (also under --target-bits)
    m.score = torch.nn.Parameter(initial_scores(mask, dense, energy.to(m.u.device), m.group_size))


@torch.no_grad()
def update(m, allocation: str) -> int:
    """Choose ``m``'s mask again from its scores; returns how many groups it kept that it did not keep before."""
    new = prune.select_mask(m.score.detach(), m.sparsity, allocation)[..., None]
    added = int((new & ~m.mask).sum())
    m.mask.copy_(new)
    return added


def freeze(m) -> None:
    """Stop learning ``m``'s mask (its forward pass is then the plain masked weight)."""
    m.score.requires_grad_(False)
    m.score.grad = None
