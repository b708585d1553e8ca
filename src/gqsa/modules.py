"""Small module-tree helpers every layer shares: swap a submodule by its dotted name, the default device."""
from __future__ import annotations

import torch
from torch import nn


def default_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``; ``None``: cuda when present, else cpu. ``ValueError`` (one line) for a
    name torch does not know, or a CUDA / MPS device this PyTorch cannot use."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this PyTorch ({torch.__version__}) has no CUDA GPU to use; "
                             f"use cpu (--device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available to this PyTorch; use cpu (--device cpu)")
    return dev


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted path ``name`` under ``root``; returns the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
