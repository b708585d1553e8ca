"""Sparsity patterns shared by the pruning baselines: ``n:m`` (keep ``n`` of every ``m`` consecutive
input weights of a row) and unstructured (keep a fraction, per row or per layer)."""
from __future__ import annotations

import math

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)`` (keep 2 of every 4); ``"unstructured"`` → ``None``."""
    if pattern in ("unstructured", "none", None):
        return None
    try:
        n, m = (int(v) for v in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"sparsity pattern '{pattern}' is neither 'unstructured' nor n:m such as 2:4") from None
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {n}:{m} must keep 0 < n < m weights of every m")
    return n, m


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive columns of each row (``score``:
    ``[N, K]``; higher = keep). A last partial block of ``r < m`` columns keeps ``min(n, r)``."""
    rows, k = score.shape
    full = k // m * m
    keep = torch.zeros_like(score, dtype=torch.bool)
    if full:
        blocks = score[:, :full].reshape(rows, -1, m)
        idx = blocks.topk(n, dim=-1).indices
        keep[:, :full] = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, full)
    if full < k:
        tail = score[:, full:]
        idx = tail.topk(min(n, k - full), dim=-1).indices
        keep[:, full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(-1, idx, True)
    return keep


def unstructured_mask(score: torch.Tensor, sparsity: float, per: str = "row") -> torch.Tensor:
    """Remove the ``round(sparsity · count)`` lowest scores of each row (``per="row"``) or of the
    whole layer (``per="layer"``); returns the kept mask."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if per == "row":
        drop = round(sparsity * score.shape[1])
        keep = torch.ones_like(score, dtype=torch.bool)
        if drop:
            keep.scatter_(1, score.topk(drop, dim=1, largest=False).indices, False)
        return keep
    if per == "layer":
        drop = round(sparsity * score.numel())
        keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
        if drop:
            keep[score.flatten().topk(drop, largest=False).indices] = False
        return keep.reshape(score.shape)
    raise ValueError(f"unknown comparison group '{per}': use row or layer")


def metadata_bits(pattern: tuple[int, int] | None) -> float:
    """Index metadata per original weight of a sparse fp16 format: ``n:m`` stores ``⌈log2 m⌉`` bits
    per kept value (NVIDIA's 2:4 layout: 2 bits per kept value = 1 bit per weight); unstructured
    stores a 1-bit-per-weight bitmap."""
    if pattern is None:
        return 1.0
    n, m = pattern
    return n * math.ceil(math.log2(m)) / m
