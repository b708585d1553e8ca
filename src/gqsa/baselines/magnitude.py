"""Magnitude pruning (the classic baseline, e.g. Han et al. 2015; as used in the SparseGPT and Wanda
papers): remove the weights of smallest ``|W|`` — over the whole layer (unstructured) or within
every ``m`` consecutive inputs of a row (``n:m``). No calibration data, no weight update."""
from __future__ import annotations

import torch

from . import masks


def magnitude_layer(w: torch.Tensor, sparsity: float = 0.5,
                    pattern: tuple[int, int] | None = (2, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(pruned weight float32, kept mask)``."""
    score = w.float().abs()
    keep = masks.unstructured_mask(score, sparsity, "layer") if pattern is None else masks.nm_mask(score, *pattern)
    return w.float() * keep, keep
