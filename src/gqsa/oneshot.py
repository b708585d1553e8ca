"""One-shot GQSA, the per-block method: each group of a block's linears calibrated, pruned, quantized in place.

Run over the whole model by :func:`compress_oneshot` through the block-wise driver
(:func:`gqsa.blockwise.run_blocks`); BQPO starts each block from :func:`oneshot_block`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import distributed, prune
from .blockwise import block_linear_groups, group_statistics, replace_linears, run_blocks
from .config import GQSAConfig
from .format import PackedLinear, pack
from .models.adapters import get_adapter


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
        stats = group_statistics(block, linears, group, batches, amp, stop_early=not adapter.generic) \
            if needs_stats else {}
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


def pack_weight(cw: prune.CompressedWeight, shape, config) -> PackedLinear:
    """The packed (CPU) form of a compressed weight of ``shape`` at ``config.bits`` / ``config.group_size``."""
    return pack(cw.codes, cw.scale, cw.zero, cw.mask, tuple(shape), config.bits, config.group_size).to("cpu")


@torch.no_grad()
def compress_oneshot(model, config: GQSAConfig, tokens: torch.Tensor, device, batch_size: int,
                     progress: bool, on_block_done: Callable[[int], None] | None = None) -> dict[str, PackedLinear]:
    """One-shot GQSA of every block; the compressed linears become :class:`GQSALinear`."""
    adapter = get_adapter(model)
    packed: dict[str, PackedLinear] = {}

    def method(i, block, prefix, batches):
        groups = block_linear_groups(adapter, block, prefix, i, config)
        cws = oneshot_block(block, adapter, groups, batches, config)
        linears = adapter.linears(block)
        for n, cw in cws.items():
            packed[f"{prefix}.{i}.{n}"] = pack_weight(cw, linears[n].weight.shape, config)

    run_blocks(model, tokens, device, batch_size, method, desc="GQSA one-shot", progress=progress,
               on_block_done=on_block_done)
    replace_linears(model, packed)
    return packed
