"""GQSA of a whole model, block by block: the one-shot step and the pipeline of stages.

One-shot (GPTQ-style sequential calibration): each decoder block receives the outputs of the
already compressed earlier blocks; inside a block, the linears are compressed group by group in
execution order (q/k/v, then o, then gate/up, then down), each group calibrated on the inputs
produced by the block as compressed so far. Only the current block (and its activations) lives on
``device``.

``config.stages`` then adds BQPO (:mod:`gqsa.stages.bqpo`: the one-shot result of each block is the
starting point of its block-wise training) and E2E-OQP (:mod:`gqsa.stages.e2e`: end-to-end scale
training on the packed model).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calib, distributed, prune
from .config import GQSAConfig
from .format import PackedLinear, pack
from .models.adapters import get_adapter
from .nn import GQSALinear


class HessianAccumulator:
    """Accumulates ``XᵀX / n`` (float32) of a linear's inputs through a forward hook."""

    def __init__(self, linear: nn.Linear):
        k = linear.in_features
        self.h = torch.zeros(k, k, dtype=torch.float32, device=linear.weight.device)
        self.n = 0
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m)).addmm_(x.T, x, alpha=1.0 / (self.n + m))
        self.n += m

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        return self.h


def _move_except(module: nn.Module, keep: nn.Module, device) -> None:
    """Move everything of ``module`` but the submodule ``keep`` to ``device``."""
    for child in module.children():
        if child is keep:
            continue
        if any(m is keep for m in child.modules()):
            _move_except(child, keep, device)
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
    _move_except(model, blocks, device)
    try:
        return calib.capture_block_inputs(model, blocks, tokens, batch_size, device)
    finally:
        _move_except(model, blocks, home)


def layers_prefix(model, adapter) -> str:
    """Module-name prefix of the decoder blocks in ``model`` (``model.layers`` or ``layers``)."""
    return adapter.layers_path if _has_path(model, adapter.layers_path) else adapter.layers_path.split(".", 1)[1]


def block_linear_groups(adapter, block, prefix: str, index: int, config: GQSAConfig) -> list[list[str]]:
    """The compressible linears of block ``index`` in execution order, grouped by shared input,
    without the ``config.skip`` ones."""
    linears = adapter.linears(block)
    out = []
    for group in adapter.linear_groups if not adapter.generic else [[n] for n in linears]:
        group = [n for n in group if n in linears and not _skipped(f"{prefix}.{index}.{n}", config.skip)]
        if group:
            out.append(group)
    return out


@torch.no_grad()
def oneshot_block(block, adapter, groups: list[list[str]], batches, config: GQSAConfig,
                  amp: Callable = None) -> dict[str, prune.CompressedWeight]:
    """One-shot GQSA of one block in place: each group of linears is calibrated (``XᵀX`` from
    ``batches`` = ``[(hidden, kwargs), …]`` through the block as compressed so far), pruned and
    quantized; its weights are replaced by the dequantized result. Returns ``{name: CompressedWeight}``.
    """
    linears = adapter.linears(block)
    needs_stats = config.saliency != "magnitude"
    out = {}
    for group in groups:
        stats = {}
        if needs_stats:
            accs = {n: HessianAccumulator(linears[n]) for n in group}
            for hidden, kw in batches:
                with amp() if amp else _null():
                    calib.block_output(block, hidden, kw)
            stats = {n: a.remove() for n, a in accs.items()}
        # the linears of a group are independent (their statistics are taken): under torchrun each
        # rank compresses some of them and sends the results to the others
        for k, n in enumerate(group):
            lin = linears[n]
            cw = None
            if distributed.owner(k) == distributed.rank():
                sparsity = getattr(lin, "gqsa_sparsity", config.sparsity)  # set by --target-bits (allocation)
                cw = prune.compress_weight(lin.weight.float(), config.bits, config.group_size, sparsity,
                                           config.saliency, config.allocation, config.quant_init, stats.get(n),
                                           config.damp, mask_method=config.mask)
            if distributed.active():
                fields = None if cw is None else {f.name: getattr(cw, f.name) for f in dataclasses.fields(cw)}
                cw = prune.CompressedWeight(**distributed.broadcast_tensors(fields, distributed.owner(k),
                                                                            lin.weight.device))
            lin.weight.copy_(cw.weight.to(lin.weight.dtype))  # later groups see the compressed layer
            out[n] = cw
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def pack_weight(cw: prune.CompressedWeight, shape, config: GQSAConfig) -> PackedLinear:
    return pack(cw.codes, cw.scale, cw.zero, cw.mask, tuple(shape), config.bits, config.group_size).to("cpu")


def compress_model(model, config: GQSAConfig, tokens: torch.Tensor, device=None, batch_size: int = 8,
                   progress: bool = True, *, workdir=None, resume: bool = False, stats: dict | None = None,
                   log: Callable[[str], None] | None = None, on_block_done: Callable[[int], None] | None = None
                   ) -> dict[str, PackedLinear]:
    """Compress every adapter-listed linear of ``model`` in place with GQSA, through the stages of
    ``config.stages`` (``oneshot``, ``bqpo`` or ``bqpo+e2e``).

    ``tokens``: calibration token windows ``[n, T]``; ``batch_size``: windows per forward pass of the
    calibration (one-shot statistics and activation propagation). The compressed linears are replaced
    by :class:`GQSALinear` modules; returns ``{module name: PackedLinear}``.

    Trained stages only: ``workdir`` (a folder) receives each finished BQPO block, so that a run
    killed mid-way continues with ``resume=True`` and ends bitwise as an uninterrupted one;
    ``stats`` (a dict) receives the per-block and per-epoch losses, times and memory; ``log``
    receives one line per block / epoch (default: printed above the progress bar);
    ``on_block_done(i)`` is called after block ``i`` is written.

    Inside a ``torch.distributed`` process group of several ranks (``torchrun``), the trained stages
    are data-parallel and rank 0 alone writes ``workdir`` (:mod:`gqsa.distributed`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.target_bits is not None:  # per-layer sparsity under the budget, from the uncompressed model
        from .allocation import apply_target_bits

        apply_target_bits(model, config, tokens, device, batch_size)
    if not distributed.is_main():  # under torchrun: rank 0 alone shows progress and logs
        progress, log = False, (lambda line: None)
    # the plan and the estimate go with the progress bar (``log`` keeps its one line per block / epoch)
    eta = _Plan(model, config, tokens, device, tqdm.write if progress else (lambda line: None), on_block_done)
    if not config.trained:
        return _compress_oneshot(model, config, tokens, device, batch_size, progress, on_block_done=eta.block_done)
    from .stages import bqpo, e2e

    stats = {} if stats is None else stats
    log = log or (tqdm.write if progress else (lambda line: None))
    on_block_done = eta.block_done
    train_tokens, val_tokens = split_calibration(tokens, config.val_fraction)
    # E2E-OQP distillation needs the uncompressed model: a copy before BQPO changes it in place
    teacher = copy.deepcopy(model) if config.stages == "bqpo+e2e" and config.e2e_loss == "kd" else None
    stats["calibration_split"] = {"train_windows": int(train_tokens.shape[0]), "val_windows": int(val_tokens.shape[0])}
    packed = bqpo.run_bqpo(model, config, tokens, int(train_tokens.shape[0]), device, batch_size, progress,
                           workdir=workdir, resume=resume, stats=stats, log=log, on_block_done=on_block_done)
    replace_linears(model, packed)
    if config.stages == "bqpo+e2e":
        packed = e2e.run_e2e(model, packed, config, train_tokens, val_tokens, device, progress, stats=stats, log=log,
                             teacher=teacher)
    return packed


class _Plan:
    """Says up front what a run will do (blocks × stages × epochs, windows, device, threads), and after
    the first block an estimate of the time left, from that block's time."""

    def __init__(self, model, config: GQSAConfig, tokens: torch.Tensor, device, log, then=None):
        self.log, self.then = log, then
        self.n_blocks = len(get_adapter(model).blocks(model))
        self.config = config
        n, t = tokens.shape
        if config.trained:
            work = f"one-shot + BQPO (up to {config.bqpo_epochs} epochs, early stop after {config.bqpo_patience})"
            if config.stages == "bqpo+e2e":
                work += f" per block, then E2E-OQP: {config.e2e_epochs} epochs over the whole model"
            else:
                work += " per block"
        else:
            work = "one-shot per block (no training)"
        threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
        log(f"GQSA: {self.n_blocks} blocks × {work}; {n} calibration windows of {t} tokens; "
            f"on {device}{threads}")
        self.t0 = time.perf_counter()
        self.first = None

    def block_done(self, i: int) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0
            left = self.n_blocks - 1 - i
            if left > 0:
                extra = " (+ E2E-OQP after the blocks)" if self.config.stages == "bqpo+e2e" else ""
                self.log(f"GQSA: first block took {self.first:.1f} s: about {self.first * left:.0f} s more for "
                         f"the other {left} blocks{extra}")
        if self.then is not None:
            self.then(i)


def split_calibration(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows): the last ``ceil(n · val_fraction)`` windows are held out
    (at least one when ``val_fraction > 0``; at least one window is always left for training)."""
    n = tokens.shape[0]
    n_val = 0 if val_fraction <= 0 else max(1, math.ceil(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"{n} calibration window(s) cannot be split into training and held-out windows "
                         f"(val_fraction={val_fraction}): use more --nsamples or val_fraction=0")
    return tokens[: n - n_val], tokens[n - n_val:]


@torch.no_grad()
def _compress_oneshot(model, config: GQSAConfig, tokens: torch.Tensor, device, batch_size: int,
                      progress: bool, on_block_done: Callable[[int], None] | None = None) -> dict[str, PackedLinear]:
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    prefix = layers_prefix(model, adapter)
    home = next(model.parameters()).device
    batches = capture_inputs(model, blocks, tokens, batch_size, device)
    packed: dict[str, PackedLinear] = {}
    bar = tqdm(total=len(blocks), desc="GQSA one-shot", unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        block.to(device)
        groups = block_linear_groups(adapter, block, prefix, i, config)
        cws = oneshot_block(block, adapter, groups, batches, config)
        linears = adapter.linears(block)
        for n, cw in cws.items():
            packed[f"{prefix}.{i}.{n}"] = pack_weight(cw, linears[n].weight.shape, config)
        batches = [(calib.block_output(block, hidden, kw), kw) for hidden, kw in batches]
        block.to(home)
        bar.update(1)
        if on_block_done is not None:
            on_block_done(i)
    bar.close()
    replace_linears(model, packed)
    return packed


def _has_path(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name.endswith(s) for s in skip)


def replace_linears(model: nn.Module, packed: dict[str, PackedLinear]) -> None:
    """Swap ``nn.Linear`` (or earlier :class:`GQSALinear`) modules for :class:`GQSALinear` ones holding
    ``packed[name]``."""
    for name, p in packed.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        dev = old.weight.device if hasattr(old, "weight") else next(iter(old.buffers()), torch.empty(0)).device
        new = GQSALinear.from_packed(p, bias).to(dev)
        setattr(parent, child, new)
