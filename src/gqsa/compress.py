"""One-shot GQSA of a whole model, block by block (GPTQ-style sequential calibration).

Each decoder block receives the outputs of the already compressed earlier blocks; inside a block,
the linears are compressed group by group in execution order (q/k/v, then o, then gate/up, then
down), each group calibrated on the inputs produced by the block as compressed so far. Only the
current block (and its activations) lives on ``device``.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calib, prune
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
def compress_model(model, config: GQSAConfig, tokens: torch.Tensor, device=None, batch_size: int = 8,
                   progress: bool = True) -> dict[str, PackedLinear]:
    """Compress every adapter-listed linear of ``model`` in place with one-shot GQSA.

    ``tokens``: calibration token windows ``[n, T]``. The compressed linears are replaced by
    :class:`GQSALinear` modules; returns ``{module name: PackedLinear}``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    prefix = adapter.layers_path if _has_path(model, adapter.layers_path) else adapter.layers_path.split(".", 1)[1]
    needs_stats = config.saliency != "magnitude"
    home = next(model.parameters()).device
    _move_except(model, blocks, device)
    try:
        batches = calib.capture_block_inputs(model, blocks, tokens, batch_size, device)
    finally:
        _move_except(model, blocks, home)
    packed: dict[str, PackedLinear] = {}
    bar = tqdm(total=len(blocks), desc="GQSA one-shot", unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        block.to(device)
        linears = adapter.linears(block)
        for group in adapter.linear_groups if not adapter.generic else [[n] for n in linears]:
            group = [n for n in group if n in linears and not _skipped(f"{prefix}.{i}.{n}", config.skip)]
            if not group:
                continue
            stats = {}
            if needs_stats:
                accs = {n: HessianAccumulator(linears[n]) for n in group}
                for hidden, kw in batches:
                    calib.block_output(block, hidden, kw)
                stats = {n: a.remove() for n, a in accs.items()}
            for n in group:
                lin = linears[n]
                cw = prune.compress_weight(lin.weight.float(), config.bits, config.group_size, config.sparsity,
                                           config.saliency, config.allocation, config.quant_init, stats.get(n),
                                           config.damp)
                lin.weight.copy_(cw.weight.to(lin.weight.dtype))  # later groups see the compressed layer
                packed[f"{prefix}.{i}.{n}"] = pack(cw.codes, cw.scale, cw.zero, cw.mask, tuple(lin.weight.shape),
                                                   config.bits, config.group_size).to("cpu")
        batches = [(calib.block_output(block, hidden, kw), kw) for hidden, kw in batches]
        block.to(home)
        bar.update(1)
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
    """Swap ``nn.Linear`` modules for :class:`GQSALinear` ones holding ``packed[name]``."""
    for name, p in packed.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        new = GQSALinear.from_packed(p, bias).to(old.weight.device if hasattr(old, "weight") else "cpu")
        setattr(parent, child, new)
