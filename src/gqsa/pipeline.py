"""The orchestrator of a GQSA compression: the plan, then the stages of ``config.stages`` in order.

One-shot (:mod:`gqsa.oneshot`, run block by block by the driver :mod:`gqsa.blockwise`: each decoder
block receives the outputs of the already compressed earlier blocks; inside a block, the linears are
compressed group by group in execution order, each group calibrated on the inputs produced by the block
as compressed so far; only the current block and its activations live on ``device``).

``config.stages`` then adds BQPO (:mod:`gqsa.stages.bqpo`: the one-shot result of each block is the
starting point of its block-wise training) and E2E-OQP (:mod:`gqsa.stages.e2e`: end-to-end scale
training on the packed model).
"""
from __future__ import annotations

import copy
import gc
import math
import time
import warnings
from dataclasses import replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import distributed
from .blockwise import block_linear_groups, layers_prefix, replace_linears
from .calib import held_out_count
from .config import GQSAConfig
from .format import PackedLinear
from .models.adapters import get_adapter
from .modules import default_device
from .oneshot import compress_oneshot
from .prune import kept_groups
from .stages.common import fmt_bytes


def compress_model(model, config: GQSAConfig, tokens: torch.Tensor, device=None, batch_size: int = 8,
                   progress: bool = True, *, workdir=None, resume: bool = False, stats: dict | None = None,
                   log: Callable[[str], None] | None = None, on_block_done: Callable[[int], None] | None = None,
                   teacher: Callable[[], torch.nn.Module] | None = None) -> dict[str, PackedLinear]:
    """Compress every adapter-listed linear of ``model`` in place with GQSA, through the stages of
    ``config.stages`` (``oneshot``, ``bqpo`` or ``bqpo+e2e``).

    ``tokens``: calibration token windows ``[n, T]``; ``batch_size``: windows per forward pass of the
    calibration (one-shot statistics and activation propagation). The compressed linears are replaced
    by :class:`GQSALinear` modules; returns ``{module name: PackedLinear}``.

    Trained stages only: ``workdir`` (a folder) receives each finished BQPO block, so that a run
    killed mid-way continues with ``resume=True`` and ends bitwise as an uninterrupted one;
    ``stats`` (a dict) receives the per-block and per-epoch losses, times and memory; ``log``
    receives one line per block / epoch (default: printed above the progress bar);
    ``on_block_done(i)`` is called after block ``i`` is written. ``teacher``: for ``e2e_loss="kd"``, a
    function returning the uncompressed model again (e.g. loading it from its source), called when E2E-OQP
    starts; without it a copy of ``model`` is made before BQPO, and held through it (twice the model's memory).

    Inside a ``torch.distributed`` process group of several ranks (``torchrun``), the trained stages
    are data-parallel and rank 0 alone writes ``workdir`` (:mod:`gqsa.distributed`).
    """
    check_arguments(model, config, tokens)
    device = default_device(device)
    check_skip(model, config)
    if config.target_bits is not None:  # per-layer sparsity under the budget, recorded in the caller's config
        from .allocation import apply_target_bits

        apply_target_bits(model, config, tokens, device, batch_size)
    # the kept codes' E2E-OQP rate when not given: trained or frozen by the stage's steps (GQSAConfig.codes_rule)
    codes_why = config.codes_rule(tokens.shape[0])[1] if config.stages == "bqpo+e2e" else None
    config = config.for_windows(tokens.shape[0])  # the training batch sizes and codes' rate not given (a copy)
    if not distributed.is_main():  # under torchrun: rank 0 alone shows progress and logs
        progress, log = False, (lambda line: None)
    else:
        for line in (sparsity_warning(model, config), skip_warning(model, config)):
            if line:
                warnings.warn(line, stacklevel=2)
    # the plan and the estimate go with the progress bar (``log`` keeps its one line per block / epoch)
    eta = _Plan(model, config, tokens, device, tqdm.write if progress else (lambda line: None), on_block_done,
                codes_why=codes_why)
    if not config.trained:
        packed = compress_oneshot(model, config, tokens, device, batch_size, progress, on_block_done=eta.block_done)
        return _with_head(model, packed, config, tokens, device, batch_size, tqdm.write if progress else None)
    from .stages import bqpo, e2e

    stats = {} if stats is None else stats
    log = log or (tqdm.write if progress else (lambda line: None))
    on_block_done = eta.block_done
    train_tokens, val_tokens = split_calibration(tokens, config.val_fraction)
    # E2E-OQP distillation needs the uncompressed model: loaded again when the stage starts, or a copy made
    # before BQPO changes the model in place
    distil = config.stages == "bqpo+e2e" and config.e2e_loss == "kd"
    uncompressed = copy.deepcopy(model) if distil and teacher is None else None
    stats["calibration_split"] = {"train_windows": int(train_tokens.shape[0]), "val_windows": int(val_tokens.shape[0])}
    if codes_why is not None:
        stats["e2e_codes"] = {"lr": config.e2e_lr_codes, "why": codes_why}
    packed = bqpo.run_bqpo(model, config, tokens, int(train_tokens.shape[0]), device, batch_size, progress,
                           workdir=workdir, resume=resume, stats=stats, log=log, on_block_done=on_block_done)
    replace_linears(model, packed)
    packed = _with_head(model, packed, config, tokens, device, batch_size, log)
    if config.stages == "bqpo+e2e":
        if distil and uncompressed is None:
            uncompressed = teacher()
        try:
            return e2e.run_e2e(model, packed, config, train_tokens, val_tokens, device, progress, stats=stats, log=log,
                               teacher=uncompressed)
        except torch.OutOfMemoryError:
            if config.e2e_lr_codes <= 0:
                raise
        # here only when training the codes ran out of memory: the stage again with the codes frozen, outside the
        # handler, so that the failed attempt's frames (and the codes' training state they hold) are freed first
        warnings.warn(f"E2E-OQP: out of {device.type} memory training the kept codes "
                      f"({fmt_bytes(kept_weights(packed) * CODE_STATE_BYTES)} of state); running it again with the "
                      f"codes frozen (--e2e-lr-codes 0 skips this attempt)", stacklevel=2)
        stats["e2e_codes_out_of_memory"] = True
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        packed = e2e.run_e2e(model, packed, replace(config, e2e_lr_codes=0.0), train_tokens, val_tokens, device,
                             progress, stats=stats, log=log, teacher=uncompressed)
    return packed


CODE_STATE_BYTES = 16  # E2E-OQP's training state per kept weight with e2e_lr_codes: latent, gradient, 2 moments


def kept_weights(packed: dict) -> int:
    """The kept (stored) weights of the packed layers ``packed`` (name → PackedLinear)."""
    return sum(int(p.col_idx.numel()) * p.group_size for p in packed.values())


def _with_head(model, packed: dict, config: GQSAConfig, tokens, device, batch_size: int, log) -> dict:
    """``packed`` plus the output layer quantized (``config.lm_head_bits``; :mod:`gqsa.head`), put in the model."""
    if config.lm_head_bits is None:
        return packed
    from .head import quantize_head

    t0 = time.perf_counter()
    name, p = quantize_head(model, tokens, config.lm_head_bits, device, batch_size, config.damp)
    replace_linears(model, {name: p})
    if log is not None:
        log(f"GQSA: output layer {name} quantized to {p.bits} bits in groups of {p.group_size}, "
            f"{time.perf_counter() - t0:.1f} s")
    return {**packed, name: p}


def block_linears(model, config: GQSAConfig | None = None):
    """``(module name, linear)`` of the decoder blocks' compressible linears, in block order; without the
    ``config.skip`` ones when ``config`` is given."""
    adapter = get_adapter(model)
    prefix = layers_prefix(model, adapter)
    for i, block in enumerate(adapter.blocks(model)):
        linears = adapter.linears(block)
        names = ([n for group in block_linear_groups(adapter, block, prefix, i, config) for n in group]
                 if config is not None else list(linears))
        for n in names:
            yield f"{prefix}.{i}.{n}", linears[n]


SPARSITY_SLACK = 0.05  # warn when whole groups per row put the model this far from --sparsity


def sparsity_warning(model, config: GQSAConfig) -> str | None:
    """One line (a warning of :func:`compress_model`) when the row-balanced masks cannot come near
    ``config.sparsity``: every row keeps ``round((1 − S)·C)`` of its ``C = ⌈K/G⌉`` groups, at least one, so rows of
    few groups (K near G) are pruned far less or far more than asked. None when the share of groups removed is
    within ``SPARSITY_SLACK`` of it, for ``--allocation layer`` (one global ranking) and for per-layer sparsities
    (``--target-bits``)."""
    if config.allocation == "layer" or config.layer_sparsity or config.target_bits is not None \
            or config.sparsity == 0:
        return None
    g, s = config.group_size, config.sparsity
    total = removed = 0
    worst = {}  # groups per row C -> (groups each row keeps, linears)
    for _, linear in block_linears(model, config):
        n, k = linear.weight.shape
        c = math.ceil(k / g)
        keep = kept_groups(c, s)
        total += n * c
        removed += n * (c - keep)
        worst[c] = (keep, worst.get(c, (keep, 0))[1] + 1)
    if not total or abs(removed / total - s) <= SPARSITY_SLACK:
        return None
    far = [c for c in sorted(worst) if abs(1 - worst[c][0] / c - s) > SPARSITY_SLACK]
    detail = "; ".join(f"{worst[c][1]} linear{'s' if worst[c][1] > 1 else ''} of {c} group{'s' if c > 1 else ''} "
                       f"per row keep{'s' if worst[c][1] == 1 else ''} {worst[c][0]}" for c in far[:3])
    return (f"--sparsity {s:g} in groups of {g} will remove {removed / total:.0%} of the groups: every "
            f"row keeps whole groups, at least one ({detail}); a smaller --group-size comes closer")


def check_arguments(model, config, tokens) -> None:
    """One clear ``TypeError``/``ValueError`` for arguments :func:`compress_model` cannot take (they failed deep
    inside the model before: an embedding lookup of float ids, an index past the vocabulary, a dict's missing
    attribute): ``config`` a :class:`GQSAConfig`, ``tokens`` an integer tensor ``[n, T]`` (n ≥ 1, T ≥ 2) of ids
    below the model's vocabulary size."""
    if not isinstance(config, GQSAConfig):
        raise TypeError(f"config must be a GQSAConfig, got {type(config).__name__} (GQSAConfig(**settings) makes one)")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"the calibration tokens must be a torch.Tensor of token ids [windows, tokens], got "
                        f"{type(tokens).__name__} (torch.tensor(ids) makes one; gqsa.calib.calibration_tokens cuts a "
                        "text into windows)")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"the calibration tokens must be integer token ids, got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"the calibration tokens must be [windows, tokens] with at least 1 window of 2 tokens, got "
                         f"shape {list(tokens.shape)}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokens.numel() and (int(tokens.min()) < 0 or (vocab and int(tokens.max()) >= vocab)):
        raise ValueError(f"the calibration tokens hold ids from {int(tokens.min())} to {int(tokens.max())}, outside "
                         f"the model's vocabulary (0 to {vocab - 1 if vocab else '?'}): tokenize with the model's own "
                         "tokenizer")


def check_skip(model, config: GQSAConfig) -> None:
    """A ``ValueError`` when ``config.skip`` leaves no compressible linear to compress (a suffix as short as
    ``proj`` matches them all): there would be nothing to write but the model itself."""
    names = [name for name, _ in block_linears(model)]
    if config.skip and names and all(any(n.endswith(s) for s in config.skip) for n in names):
        raise ValueError(f"--skip {' '.join(config.skip)} skips every compressible linear ({len(names)} of "
                         f"{len(names)}, e.g. {names[-1]}): nothing would be compressed; skip whole names' suffixes "
                         "such as mlp.down_proj")


def skip_warning(model, config: GQSAConfig) -> str | None:
    """One line when a ``config.skip`` suffix matches none of the compressible linears (a misspelt name would
    otherwise compress the layer meant to stay dense, without a word)."""
    if not config.skip:
        return None
    names = [name for name, _ in block_linears(model)]
    unmatched = [s for s in config.skip if not any(n.endswith(s) for n in names)]
    if not unmatched or not names:
        return None
    return (f"--skip {' '.join(unmatched)}: no compressible linear's name ends with "
            f"{'it' if len(unmatched) == 1 else 'them'} (names look like {names[-1]}); nothing is skipped for "
            f"{'it' if len(unmatched) == 1 else 'them'}")


class _Plan:
    """Says up front what a run will do (blocks × stages × epochs, windows, device, threads), and after
    the first block an estimate of the time left, from that block's time."""

    def __init__(self, model, config: GQSAConfig, tokens: torch.Tensor, device, log, then=None,
                 codes_why: str | None = None):
        self.log, self.then = log, then
        self.n_blocks = len(get_adapter(model).blocks(model))
        self.config = config
        n, t = tokens.shape
        if config.trained:
            work = (f"one-shot + BQPO (up to {config.bqpo_epochs} epochs of {config.bqpo_batch_size}-window steps, "
                    f"early stop after {config.bqpo_patience})")
            if config.stages == "bqpo+e2e":
                work += f" per block, then E2E-OQP: {config.e2e_epochs} epochs over the whole model"
                if config.e2e_loss == "kd":
                    work += " distilled from the uncompressed model"
                auto = f"{codes_why}; " if codes_why and codes_why.startswith("auto") else ""
                if config.e2e_lr_codes > 0:  # the largest memory item of the stage: say it up front
                    kept = sum(lin.weight.numel() for _, lin in block_linears(model, config)) * (1 - config.sparsity)
                    work += (f", codes trained at {config.e2e_lr_codes:g} ({auto}about "
                             f"{fmt_bytes(int(kept * CODE_STATE_BYTES))} of training state; --e2e-lr-codes 0 freezes "
                             f"them)")
                elif auto:  # frozen by the rule: say why
                    work += f", codes frozen ({codes_why})"
            else:
                work += " per block"
        else:
            work = "one-shot per block (no training)"
        if config.lm_head_bits is not None:
            work += f", and the output layer at {config.lm_head_bits} bits"
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
    (at least one when ``val_fraction > 0``; at least one window is always left for training;
    :func:`gqsa.calib.held_out_count`). ``calib.calibration_tokens(…, val_fraction=)`` draws those windows
    from text the training windows never cover."""
    n = tokens.shape[0]
    n_val = held_out_count(n, val_fraction)
    if n_val >= n:
        raise ValueError(f"{n} calibration window(s) cannot be split into training and held-out windows "
                         f"(val_fraction={val_fraction}): use more --nsamples or val_fraction=0")
    return tokens[: n - n_val], tokens[n - n_val:]
