"""Static KV cache: fixed-size key/value tensors, written in place at slot indices.

One tensor pair for all layers, ``[layers, B, kv_heads, L, head_dim]``, allocated once per engine
session: every decode step writes its keys and values at the same slot (``index_copy_`` with a device
tensor of slot indices), so the step has fixed shapes and fixed addresses and can be captured in a
CUDA graph. ``valid[B, L]`` marks the slots that hold real tokens (left padding of shorter prompts is
never valid); attention reads the first ``kv_len`` slots with that mask.

(transformers' ``StaticCache`` does the same job, but its update contract changes between releases —
5.23 keeps an internal in-place position counter per layer — and the engine needs per-step control of
the written slot and of the attended prefix, so it keeps its own two tensors.)
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        if min(n_layers, batch_size, n_kv_heads, max_len, head_dim) <= 0:
            raise ValueError(f"cache dimensions must be positive, got layers={n_layers}, batch={batch_size}, "
                             f"kv_heads={n_kv_heads}, max_len={max_len}, head_dim={head_dim}")
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.batch_size, self.max_len = batch_size, max_len

    def reset(self) -> None:
        """Forget every token (the tensors keep their addresses, so captured graphs stay valid)."""
        self.valid.zero_()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store ``k, v`` ``[B, kv_heads, T, D]`` at ``slots`` ``[T]`` of ``layer``."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)

    def view(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``kv_len`` slots of ``layer``: ``[B, kv_heads, kv_len, D]`` views."""
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
