"""Pieces shared by the trained stages: storage-precision rounding with straight-through gradients,
autocast, peak-memory readings, cosine schedules, batched replay of a block."""
from __future__ import annotations

import contextlib
import math
import resource

import torch

from .. import calib, quant
from ..format import PackedLinear
from ..kernels import reference
from ..modules import replace_submodule


def round_scale_ste(s: torch.Tensor) -> torch.Tensor:
    """:func:`gqsa.quant.round_scale` (clamp to a positive float16 and round to it) in the forward
    pass, identity gradient: the trained scale is, bit for bit, the one a checkpoint stores."""
    return quant.straight_through(quant.round_scale, s)


def round_half_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 in the forward pass (keeping the dtype), identity gradient (float zero points)."""
    return quant.straight_through(_to_half_and_back, x)


def _to_half_and_back(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the trained stages (``auto``: bfloat16 on CUDA, none elsewhere)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16 if amp in ("auto", "bfloat16") else torch.float16


def autocast(dtype: torch.dtype | None, device: torch.device):
    """A context factory: ``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what): the accelerator's peak allocation since :func:`reset_peak`, or on CPU the
    process's peak resident set size (since the start of the process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "peak GPU"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def cosine(total_steps: int):
    """LambdaLR factor: cosine decay from 1 to 0 over ``total_steps`` optimizer steps."""
    total = max(1, total_steps)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


class Trainer:
    """The optimizer loop both trained stages share: AdamW without weight decay over ``groups``
    (``[{"params": …, "lr": …}, …]``) with the cosine schedule over ``total`` steps; :meth:`step` is one
    optimizer step. The best held-out epoch is tracked with :meth:`epoch_done`: ``snapshot()`` copies the
    trainable state (``restore(state)`` puts it back, at :meth:`finish`), and after ``patience`` epochs
    without improvement (None: never) ``epoch_done`` says stop."""

    def __init__(self, groups: list[dict], total: int, val_before, snapshot, restore, patience: int | None = None):
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine(total))
        self.best, self.best_epoch, self.bad = val_before, 0, 0
        self.snapshot, self.restore, self.patience = snapshot, restore, patience
        self.state = snapshot()

    def step(self) -> None:
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def epoch_done(self, epoch: int, val_loss: float | None) -> bool:
        """Record ``epoch``'s held-out loss (None: no held-out windows, the last epoch is kept); True = stop."""
        if val_loss is None:
            self.best_epoch, self.state = epoch, None
            return False
        if val_loss < self.best:
            self.best, self.best_epoch, self.state, self.bad = val_loss, epoch, self.snapshot(), 0
            return False
        self.bad += 1
        return self.patience is not None and self.bad >= self.patience

    def finish(self) -> None:
        """Put the best epoch's state back (nothing to do without held-out windows)."""
        if self.state is not None:
            self.restore(self.state)


@torch.no_grad()
def block_forward_all(block, x: torch.Tensor, kwargs: dict, batch_size: int, device, amp,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``block`` applied to all windows of ``x`` ``[n, T, d]`` (on any device, any storage dtype) in
    batches, fed in the block's own dtype; the result has ``x``'s device and dtype and goes to
    ``out`` when given (``out=x`` works in place: windows are independent)."""
    dtype = block_dtype(block)
    out = torch.empty_like(x) if out is None else out
    for i in range(0, x.shape[0], batch_size):
        with amp():
            y = calib.block_output(block, x[i:i + batch_size].to(device, dtype), kwargs)
        out[i:i + batch_size] = y.to(out.device, out.dtype)
    return out


def block_dtype(block) -> torch.dtype:
    """The floating dtype of a block's parameters (its compute dtype)."""
    for p in block.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def verify_packed(p: PackedLinear, weight: torch.Tensor, name: str) -> None:
    """The packed layer must dequantize, bit for bit, to the weight the model was trained with."""
    if not torch.equal(reference.dequantize(p).to(weight.device), weight.float()):
        raise RuntimeError(f"{name}: the packed layer does not dequantize to the trained weight (a gqsa bug)")


@contextlib.contextmanager
def training_swap(root, modules: dict, before_swap=None):
    """Freeze every parameter of ``root`` and put the training-time ``modules`` at their dotted names (after
    ``before_swap(name, old)`` for each); on exit, whatever happened, the old modules go back and every
    parameter gets its ``requires_grad`` again. Yields ``{name: old module}``."""
    frozen = [(p, p.requires_grad) for p in root.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    olds = {}
    try:
        for name, module in modules.items():
            if before_swap is not None:
                before_swap(name, root.get_submodule(name))
            olds[name] = replace_submodule(root, name, module)
        yield olds
    finally:
        for name, old in olds.items():
            replace_submodule(root, name, old)
        for p, flag in frozen:
            p.requires_grad_(flag)
