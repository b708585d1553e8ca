"""The block-wise driver: capture the first block's inputs, run a per-block method on each decoder block
in turn (only that block on the device), propagate the compressed block's outputs to the next.

One-shot GQSA (:mod:`gqsa.oneshot`), the baselines (:mod:`gqsa.baselines.runner`) and BQPO
(:mod:`gqsa.stages.bqpo`, with its own activation store and resume) are methods run by :func:`run_blocks`;
the pieces (input capture, linear groups, their statistics, the module swap) are here too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calib
from .models.adapters import get_adapter
from .modules import replace_submodule


class HessianAccumulator:
    """Accumulates ``XᵀX / n`` (float32) of a linear's inputs through a forward hook."""

    def __init__(self, linear: nn.Linear):
        k = linear.in_features
        self.h = torch.zeros(k, k, dtype=torch.float32, device=linear.weight.device)
        self.n = 0
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.add(args[0])

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the inputs ``x`` ``[..., K]``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m)).addmm_(x.T, x, alpha=1.0 / (self.n + m))
        self.n += m

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        return self.h


def move_except(module: nn.Module, keep: nn.Module, device) -> None:
    """Move everything of ``module`` but the submodule ``keep`` to ``device``."""
    for child in module.children():
        if child is keep:
            continue
        if any(m is keep for m in child.modules()):
            move_except(child, keep, device)
        else:
            child.to(device)
    for name, p in list(module._parameters.items()):
        if p is not None:
            module._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
    for name, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[name] = b.to(device)


@torch.no_grad()
def capture_inputs(model, blocks, tokens: torch.Tensor, batch_size: int, device) -> list:
    """``[(hidden, kwargs), …]`` inputs of the first decoder block for ``tokens`` (batches of
    ``batch_size`` windows), computed on ``device`` with everything but the blocks moved there and back."""
    home = next(model.parameters()).device
    move_except(model, blocks, device)
    try:
        return calib.capture_block_inputs(model, blocks, tokens, batch_size, device)
    finally:
        move_except(model, blocks, home)


def has_path(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def layers_prefix(model, adapter) -> str:
    """Module-name prefix of the decoder blocks in ``model`` (``model.layers`` or ``layers``)."""
    return adapter.layers_path if has_path(model, adapter.layers_path) else adapter.layers_path.split(".", 1)[1]


def skipped(name: str, skip: list[str]) -> bool:
    """``name`` ends with one of the ``skip`` suffixes (left dense)."""
    return any(name.endswith(s) for s in skip)


def block_linear_groups(adapter, block, prefix: str, index: int, config) -> list[list[str]]:
    """The compressible linears of block ``index`` in execution order, grouped by shared input,
    without the ``config.skip`` ones."""
    linears = adapter.linears(block)
    out = []
    for group in adapter.linear_groups if not adapter.generic else [[n] for n in linears]:
        group = [n for n in group if n in linears and not skipped(f"{prefix}.{index}.{n}", config.skip)]
        if group:
            out.append(group)
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _GroupSeen(Exception):
    """Raised once every linear of a group has seen a batch: the rest of the block's forward is not needed."""


@torch.no_grad()
def group_statistics(block, linears: dict, group: list[str], batches, amp: Callable | None = None,
                     stop_early: bool = True) -> dict:
    """``{name: XᵀX / n}`` of the linears of ``group``: ``batches`` (``[(hidden, kwargs), …]``) run through
    ``block`` as compressed so far. ``stop_early``: each forward pass stops as soon as every linear of the group
    has run (the statistics are the same; the first group of a block then costs almost nothing and the last one
    skips the block's tail) — only for blocks that call each linear once per pass (the adapters' architectures,
    not the generic fallback)."""
    accs = {n: HessianAccumulator(linears[n]) for n in group}
    pending: set[str] = set()

    def seen(name):
        def hook(module, args, output):  # after the accumulator's hook, registered first
            pending.discard(name)
            if not pending:
                raise _GroupSeen
        return hook

    handles = [linears[n].register_forward_hook(seen(n)) for n in group] if stop_early else []
    try:
        for hidden, kw in batches:
            pending.update(group)
            try:
                with amp() if amp else _null():
                    calib.block_output(block, hidden, kw)
            except _GroupSeen:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: a.remove() for n, a in accs.items()}


def propagate_batches(block, batches: list) -> list:
    """The outputs of ``block`` for ``batches`` = ``[(hidden, kwargs), …]``: the next block's inputs."""
    return [(calib.block_output(block, hidden, kw), kw) for hidden, kw in batches]


def run_blocks(model, tokens: torch.Tensor | None, device, batch_size: int,
               method: Callable[[int, nn.Module, str, object], None], *, desc: str, progress: bool = True,
               on_block_done: Callable[[int], None] | None = None, inputs=None,
               propagate: Callable[[nn.Module, object], object] = propagate_batches,
               start: Callable[[int], None] | None = None, finish: Callable[[int], None] | None = None) -> None:
    """Run ``method(i, block, prefix, inputs)`` on every decoder block in order, the block on ``device``
    (and back to where the model lives after it).

    ``inputs`` are the block's inputs: by default ``[(hidden, kwargs), …]`` captured for ``tokens`` (``None``
    without tokens), or whatever store the caller passes (BQPO: one tensor of all windows, maybe offloaded
    to the CPU); after ``method`` changed the block, ``propagate(block, inputs)`` gives the next block's
    inputs, so each block is calibrated on the already compressed earlier blocks. ``start(i)`` runs before
    block ``i`` moves to the device, ``finish(i)`` after its outputs are propagated (the block still on the
    device), ``on_block_done(i)`` at the very end of the block. Gradients are the method's affair: wrap a
    method that needs none in ``torch.no_grad()``.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    prefix = layers_prefix(model, adapter)
    home = next(model.parameters()).device
    if inputs is None and tokens is not None:
        inputs = capture_inputs(model, blocks, tokens, batch_size, device)
    bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        if start is not None:
            start(i)
        block.to(device)
        method(i, block, prefix, inputs)
        if inputs is not None:
            inputs = propagate(block, inputs)
        if finish is not None:
            finish(i)
        block.to(home)
        bar.update(1)
        if on_block_done is not None:
            on_block_done(i)
    bar.close()


def replace_linears(model: nn.Module, packed: dict) -> None:
    """Swap ``nn.Linear`` (or earlier :class:`GQSALinear`) modules for :class:`GQSALinear` ones holding
    ``packed[name]``."""
    from .nn import GQSALinear

    for name, p in packed.items():
        old = model.get_submodule(name)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        dev = old.weight.device if hasattr(old, "weight") else next(iter(old.buffers()), torch.empty(0)).device
        replace_submodule(model, name, GQSALinear.from_packed(p, bias).to(dev))
