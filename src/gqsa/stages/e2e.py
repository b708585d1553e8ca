"""E2E-OQP — end-to-end optimized quantization-pruning: the mask is frozen (the packed ``row_ptr`` and
``col_idx`` never change); the scales (and, with ``e2e_train_zero``, the zero points, then stored as
float16) and, unless ``e2e_lr_codes`` is 0, the kept weights' integer codes (a real latent value per kept
weight, rounded with a straight-through gradient: end-to-end quantization-aware training at the frozen
mask) are trained with the KL from the uncompressed model's next-token distribution (``e2e_loss="kd"``,
the default) or the causal-LM loss on the calibration windows (``"lm"``).

Each packed layer becomes a :class:`ScaleTrainableLinear` whose forward weight is, bit for bit, the
weight its exported :class:`~gqsa.format.PackedLinear` dequantizes to: the scale is rounded to
float16 in the forward pass (straight-through gradient), so what is trained is what is stored.
A held-out loss is measured before training and after every epoch; the best epoch is kept (the BQPO
result itself when no epoch beats it).

Device memory: the whole packed model (codes stay packed; a layer's dense weight exists only while
it runs) + per kept group 16 B (fp32 scale multiplier, its gradient, two AdamW moments; twice that
with zero points) + with ``e2e_lr_codes``, 16 B per kept *weight* (the same for its latent code) + with
``kd``, the uncompressed model + the activations of one micro-batch: with gradient checkpointing one
block's intermediates plus each block's input (``L · b · T · d``), and the logits ``b · T · vocab``.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .. import distributed
from ..blockwise import replace_linears
from ..config import GQSAConfig
from ..format import PackedLinear
from ..models.adapters import get_adapter
from . import common
from .common import verify_packed
from .trainable import ScaleTrainableLinear


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of ``ids`` ``[b, T]``."""
    logits = model(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def distillation_loss(model, ids: torch.Tensor, teacher) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ model) of the next-token distributions over ``ids`` ``[b, T]``."""
    logits = model(ids, use_cache=False).logits.float()
    with torch.no_grad():
        target = teacher(ids, use_cache=False).logits.float()
    v = logits.shape[-1]
    return F.kl_div(F.log_softmax(logits, -1).reshape(-1, v), F.log_softmax(target, -1).reshape(-1, v),
                    log_target=True, reduction="batchmean")


@torch.no_grad()
def _eval_loss(model, tokens: torch.Tensor, bs: int, device, amp, objective=causal_lm_loss) -> float:
    total = 0.0
    for batch in tokens.split(bs):
        with amp():
            total += objective(model, batch.to(device)).item() * batch.shape[0]
    return total / tokens.shape[0]


def distributed_backward(trained, tokens: torch.Tensor, idx: torch.Tensor, windows: int, device, amp,
                          objective=causal_lm_loss) -> float:
    """This process's shares of micro-batch ``idx`` (of an optimizer step of ``windows`` windows,
    :func:`distributed.shares`): backward of each share's mean loss weighted by its windows' part of the
    step × the share's factor, so that the step's gradient (summed over shares, averaged by DDP over the
    ranks) is that of the mean loss over all its windows. Returns the micro-batch's summed loss over all
    shares and ranks (for the log)."""
    total = 0.0
    for mine, factor in distributed.shares(idx):
        with amp():
            loss = objective(trained, tokens[mine].to(device))
        (loss * (factor * len(mine) / windows)).backward()
        total += loss.item() * len(mine) * (factor > 0)
    return distributed.sum_over_ranks(total, device)


def run_e2e(model, packed: dict[str, PackedLinear], config: GQSAConfig, train_tokens: torch.Tensor,
            val_tokens: torch.Tensor, device, progress: bool = True, *, stats: dict | None = None,
            log: Callable[[str], None] | None = None, teacher=None) -> dict[str, PackedLinear]:
    """Train the scales (and, ``config.e2e_lr_codes`` > 0, the codes) of the packed layers of ``model`` (the
    names of ``packed``, currently :class:`GQSALinear` or ``nn.Linear`` modules) end to end; they end as
    :class:`GQSALinear` modules holding the trained layers, which are returned.

    ``config.e2e_loss``: ``kd`` (default) — KL(``teacher`` ‖ model) per token, ``teacher`` being the
    uncompressed model (moved to ``device`` for the stage: its memory comes on top); ``lm`` — the causal-LM
    loss of the calibration windows. Held-out selection uses the same objective.
    """
    device = torch.device(device)
    config = config.for_windows(train_tokens.shape[0] + val_tokens.shape[0])
    if config.e2e_loss == "kd":
        if teacher is None:
            raise ValueError("e2e_loss='kd' distils from the uncompressed model: pass it as teacher=")
        objective = functools.partial(distillation_loss, teacher=teacher)
        teacher_home = next(teacher.parameters()).device
        teacher.to(device).eval()
    else:
        objective = causal_lm_loss
    what = "KL to the uncompressed model" if config.e2e_loss == "kd" else "loss"
    stats = {} if stats is None else stats
    log = log or (lambda line: None)
    amp = common.autocast(common.amp_dtype(config.amp, device), device)
    home = next(model.parameters()).device
    was_training = model.training
    t0 = time.perf_counter()
    common.reset_peak(device)
    mods = {}
    blocks = get_adapter(model).blocks(model)
    e2e = {"epochs": [], "train_windows": int(train_tokens.shape[0]), "val_windows": int(val_tokens.shape[0])}
    stats["e2e"] = e2e
    for name, p in packed.items():
        old = model.get_submodule(name)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        mods[name] = ScaleTrainableLinear(p, bias, config.e2e_train_zero, train_codes=config.e2e_lr_codes > 0)
    try:
        with common.training_swap(model, mods):
            if config.e2e_grad_checkpointing:
                for block in blocks:
                    block.forward = _checkpointed(block.forward)
            model.to(device)
            model.eval()  # no dropout: the loss is the deterministic calibration loss
            groups = [{"params": [m.gamma for m in mods.values()]
                       + ([m.zero for m in mods.values()] if config.e2e_train_zero else []), "lr": config.e2e_lr}]
            if config.e2e_lr_codes > 0:  # the kept weights' latent codes, in code units
                groups.append({"params": [m.codes_latent for m in mods.values()], "lr": config.e2e_lr_codes})
            groups = [g for g in groups if g["lr"] > 0]
            params = [q for g in groups for q in g["params"]]
            trained = {id(q) for q in params}
            for m in mods.values():
                for q in m.parameters():
                    q.requires_grad_(id(q) in trained)
            bs, accum = config.e2e_batch_size, config.e2e_grad_accum
            e2e["batch_size"] = bs
            n_val = val_tokens.shape[0]
            before = _eval_loss(model, val_tokens, bs, device, amp, objective) if n_val else None
            e2e["val_loss_before"] = before
            best, best_epoch = before, 0
            micro = math.ceil(train_tokens.shape[0] / bs)
            steps_per_epoch = math.ceil(micro / accum)
            total = steps_per_epoch * config.e2e_epochs
            if before is not None:
                log(f"E2E-OQP: held-out {what} {before:.4f}{_ppl(before, config)} before training")
            if total and params:
                trainer = common.Trainer(groups, total, before,
                                         lambda: [q.detach().to("cpu", copy=True) for q in params], _restore(params))
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983)
                bar = tqdm(total=total, desc="GQSA E2E-OQP", unit="step", disable=not progress)
                trained = distributed.wrap(model, device)  # DDP under torchrun, else the model itself
                for epoch in range(1, config.e2e_epochs + 1):
                    te = time.perf_counter()
                    perm = torch.randperm(train_tokens.shape[0], generator=gen).split(bs)
                    running, seen = 0.0, 0
                    for k in range(0, len(perm), accum):
                        step = perm[k:k + accum]
                        windows = sum(len(idx) for idx in step)
                        for idx in step:  # the step's gradient = that of the mean loss over its windows
                            if distributed.split_batches():
                                running += distributed_backward(trained, train_tokens, idx, windows, device, amp,
                                                                 objective)
                                seen += len(idx)
                                continue
                            with amp():
                                loss = objective(model, train_tokens[idx].to(device))
                            (loss * (len(idx) / windows)).backward()
                            running += loss.item() * len(idx)
                            seen += len(idx)
                        trainer.step()
                        bar.update(1)
                    row = {"epoch": epoch, "train_loss": running / seen, "seconds": round(time.perf_counter() - te, 2)}
                    if n_val:
                        row["val_loss"] = _eval_loss(model, val_tokens, bs, device, amp, objective)
                    trainer.epoch_done(epoch, row.get("val_loss"))
                    e2e["epochs"].append(row)
                    held = f", held-out {row['val_loss']:.4f}{_ppl(row['val_loss'], config)}" if n_val else ""
                    log(f"E2E-OQP epoch {epoch}/{config.e2e_epochs}: train loss {row['train_loss']:.4f}{held}, "
                        f"{row['seconds']:.1f} s")
                bar.close()
                trainer.finish()
                best, best_epoch = trainer.best, trainer.best_epoch
            e2e.update(best_epoch=best_epoch, val_loss_after=best)
            out = {}
            distributed.check_same("E2E-OQP", {str(k): q for k, q in enumerate(params)})
            for name, m in mods.items():
                out[name] = m.export().to("cpu")
                with torch.no_grad():
                    verify_packed(out[name], m.weight(), name)
    finally:
        if config.e2e_grad_checkpointing:
            for block in blocks:
                block.__dict__.pop("forward", None)
        model.train(was_training)
        model.to(home)
        if config.e2e_loss == "kd":
            teacher.to(teacher_home)
    replace_linears(model, out)
    mem, kind = common.peak_memory(device)
    e2e.update(seconds=round(time.perf_counter() - t0, 2), peak_memory_bytes=mem, peak_memory_kind=kind)
    if best is not None:
        log(f"E2E-OQP: held-out {what} {before:.4f} → {best:.4f} (best epoch {best_epoch}/{config.e2e_epochs}), "
            f"{e2e['seconds']:.1f} s, {kind} {common.fmt_bytes(mem)}")
    return out


def _restore(params):
    @torch.no_grad()
    def restore(state):
        for q, saved in zip(params, state):
            q.copy_(saved)
    return restore


def _ppl(loss: float, config: GQSAConfig) -> str:
    return f" (ppl {math.exp(loss):.2f})" if config.e2e_loss == "lm" else ""
