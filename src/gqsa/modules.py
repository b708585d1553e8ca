"""Small module-tree helpers every layer shares: swap a submodule by its dotted name, the default device."""
from __future__ import annotations

import torch
from torch import nn


def default_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``; ``None``: cuda when present, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted path ``name`` under ``root``; returns the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
