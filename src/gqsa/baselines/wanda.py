"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2024):
score every weight by ``|W_ij| · ‖X_j‖₂`` (the input feature's activation norm over the
calibration tokens) and remove the lowest scores within each output row (unstructured) or within
every ``m`` consecutive inputs of a row (``n:m``). No weight update."""
from __future__ import annotations

import torch

from . import masks


def wanda_score(w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖X_col‖₂`` with ``‖X_col‖₂² ∝ diag(XᵀX)`` (a common factor does not change any ranking)."""
    return w.float().abs() * hessian.diagonal().float().clamp(min=0).sqrt()[None, :]


def wanda_layer(w: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                pattern: tuple[int, int] | None = (2, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(pruned weight float32, kept mask)``."""
    score = wanda_score(w, hessian)
    keep = masks.unstructured_mask(score, sparsity, "row") if pattern is None else masks.nm_mask(score, *pattern)
    return w.float() * keep, keep
