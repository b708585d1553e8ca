"""BQPO — block-wise quantization-pruning optimization.

For each decoder block in order:

1. its inputs ``X_q`` are the outputs of the already compressed earlier blocks on the calibration
   windows; its target ``Y`` is the uncompressed block's output on the uncompressed model's
   activations ``X_fp`` (``bqpo_target="fp"``, default) or on ``X_q`` (``"qinput"``);
2. one-shot GQSA of the block (saliency, mask, OBS/RTN quantization: :func:`gqsa.oneshot.oneshot_block`)
   gives the starting point: mask, integer codes, ``s``, ``z``;
3. each linear becomes a :class:`FakeQuantLinear` whose latent weights, scales and zero points are
   trained through fake quantization (straight-through rounding, the mask held: pruned groups are
   exactly zero) to minimize ``MSE(block(X_q), Y)`` with AdamW (one learning rate per kind of
   parameter), a cosine schedule, and early stopping / best-epoch selection on the held-out windows;
4. the latent weights are rounded to integer codes and frozen; the block's linears take the
   dequantized weights, ``X_q`` moves on through the compressed block and ``X_fp`` through the
   uncompressed one, and the block is written to the work folder (resume).

Device memory (only the current block and the activations live there):

    activations   2 · n · T · d · a        (X_q and Y; a = bytes of ``activation_dtype``;
                                            0 with ``offload_activations``, then per batch only)
    block         ≈ 24 · P_block           (fp32 latent weights, their gradient, two AdamW moments
                                            and the best epoch's copy: 20 B; the dequantized weight
                                            kept for the matmul's backward: 2-4 B; during the
                                            one-shot step instead: the block (4 B) and XᵀX, a few
                                            4·K² copies for the widest linear)
    training      one batch's activations of the block (b = ``bqpo_batch_size`` windows)

e.g. LLaMA-2-70B (d = 8192, P_block = 856 M) with 128 × 2048 windows in bfloat16 activations:
2 · 128 · 2048 · 8192 · 2 B = 8 GiB + 24 · 0.856 G = 20.5 GB + a batch ⇒ one 80 GB GPU, whatever the
number of blocks; the rest of the model waits in CPU memory (measured: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .. import calib, distributed, prune
from ..blockwise import block_linear_groups, capture_inputs, layers_prefix, run_blocks
from ..config import GQSAConfig
from ..format import PackedLinear
from ..kernels import reference
from ..models.adapters import get_adapter
from ..oneshot import oneshot_block, pack_weight
from ..prune import CompressedWeight
from . import common, mask_learning
from .common import verify_packed
from .trainable import FakeQuantLinear
from .workdir import BlockStore, tensor_sha256

# Settings that do not change BQPO's result (a run may resume with other values of these).
_NOT_BQPO = ("e2e_epochs", "e2e_batch_size", "e2e_grad_accum", "e2e_lr", "e2e_lr_codes", "e2e_train_zero",
             "e2e_loss", "e2e_grad_checkpointing", "stages", "offload_activations",
             "lm_head_bits")  # (the head comes after)


class _Batches:
    """Re-iterable ``(hidden, kwargs)`` batches of stored activations, moved to the device per batch."""

    def __init__(self, x: torch.Tensor, kwargs: dict, batch_size: int, device, dtype):
        self.x, self.kwargs, self.bs, self.device, self.dtype = x, kwargs, batch_size, device, dtype

    def __iter__(self):
        for i in range(0, self.x.shape[0], self.bs):
            yield self.x[i:i + self.bs].to(self.device, self.dtype), self.kwargs


def run_bqpo(model, config: GQSAConfig, tokens: torch.Tensor, n_train: int, device, batch_size: int = 8,
             progress: bool = True, *, workdir=None, resume: bool = False, stats: dict | None = None,
             log: Callable[[str], None] | None = None,
             on_block_done: Callable[[int], None] | None = None) -> dict[str, PackedLinear]:
    """BQPO over all blocks of ``model``; ``tokens[:n_train]`` are trained on, the rest held out.

    The model's compressible linears end with the trained dequantized weights (still ``nn.Linear``);
    returns ``{name: PackedLinear}``. See the module docstring for ``workdir``/``resume``.
    """
    device = torch.device(device)
    config = config.for_windows(tokens.shape[0])
    stats = {} if stats is None else stats
    log = log or (lambda line: None)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    prefix = layers_prefix(model, adapter)
    amp = common.autocast(common.amp_dtype(config.amp, device), device)
    act_device = torch.device("cpu") if config.offload_activations else device
    act_dtype = getattr(torch, config.activation_dtype)
    store = None
    if workdir is not None:
        fingerprint = _fingerprint(model, blocks, config, tokens, n_train, batch_size, device)
        notes = {"torch_threads": torch.get_num_threads(), "world_size": distributed.world_size()}
        # rank 0 makes (or checks) the folder; the other ranks then only read it
        store = distributed.on_main(lambda: BlockStore(workdir, fingerprint, resume, notes=notes))
        if store is None:
            store = BlockStore(workdir, fingerprint, resume=True, notes=notes)
    done = store.finished(len(blocks)) if store else 0
    packed: dict[str, PackedLinear] = {}
    block_stats: list[dict] = stats.setdefault("bqpo", [])
    if done == len(blocks):  # every block is finished: nothing to replay
        for i, block in enumerate(blocks):
            p_i, s_i = store.load(i)
            _set_block_weights(block, adapter, prefix, i, p_i)
            packed.update(p_i)
            block_stats.append({**s_i, "resumed": True})
        log(f"BQPO: all {len(blocks)} blocks read back from {store.folder}")
        return packed

    batches = capture_inputs(model, blocks, tokens, batch_size, device)
    kwargs = capture_inputs(model, blocks, tokens[:1], 1, device)[0][1]  # broadcasts over the batch
    x_q = torch.cat([h.to(act_device, act_dtype) for h, _ in batches])
    del batches
    x_fp = x_q.clone() if config.bqpo_target == "fp" else None
    if done:
        log(f"BQPO: resuming from {store.folder}: blocks 0-{done - 1} are finished, replaying them")
    current = {}

    def start(i):
        current.update(t0=time.perf_counter(), p_i=None, s_i=None)
        common.reset_peak(device)

    def method(i, block, prefix, x_q):
        t0 = current["t0"]
        if i < done:
            # replay a finished block: the same forward passes as when it was made
            if x_fp is not None:
                common.block_forward_all(block, x_fp, kwargs, batch_size, device, amp, out=x_fp)
            p_i, s_i = store.load(i)
            _set_block_weights(block, adapter, prefix, i, p_i)
            block_stats.append({**s_i, "resumed": True})
        else:
            source = x_fp if x_fp is not None else x_q
            y = common.block_forward_all(block, source, kwargs, batch_size, device, amp,
                                         out=x_fp if x_fp is not None else None)
            groups = block_linear_groups(adapter, block, prefix, i, config)
            start_config = dataclasses.replace(config, sparsity=0.0) if config.bqpo_gradual else config
            linears = adapter.linears(block)
            dense = {n: linears[n].weight.detach().float().clone() for g in groups for n in g} \
                if config.bqpo_learn_mask else None
            init = oneshot_block(block, adapter, groups, _Batches(x_q, kwargs, batch_size, device,
                                                                  common.block_dtype(block)), start_config, amp)
            t_init = time.perf_counter() - t0
            cws, s_i = train_block(block, init, x_q, y, n_train, kwargs, config, device, amp,
                                   seed=config.seed * 1_000_003 + i, dense=dense)
            del y, dense
            p_i = {}
            for n, cw in cws.items():
                name = f"{prefix}.{i}.{n}"
                p_i[name] = pack_weight(cw, linears[n].weight.shape, config)
                verify_packed(p_i[name], cw.weight, name)
            _sync(device)
            s_i.update(block=i, seconds=round(time.perf_counter() - t0, 2), oneshot_seconds=round(t_init, 2))
            mem, kind = common.peak_memory(device)
            s_i.update(peak_memory_bytes=mem, peak_memory_kind=kind)
            distributed.check_same(f"BQPO block {i}", {f"{n}.{t}": v for n, p in p_i.items()
                                                       for t, v in p.tensors().items()})
            block_stats.append(s_i)
            log(_log_line(i, len(blocks), s_i))
        current.update(p_i=p_i, s_i=s_i)

    def propagate(block, x_q):
        return common.block_forward_all(block, x_q, kwargs, batch_size, device, amp, out=x_q)

    def finish(i):
        p_i, s_i = current["p_i"], current["s_i"]
        if i >= done and store is not None:
            distributed.on_main(lambda: store.save(i, p_i, s_i))
        packed.update(p_i)

    run_blocks(model, None, device, batch_size, method, desc="GQSA BQPO", progress=progress, inputs=x_q,
               propagate=propagate, start=start, finish=finish,
               on_block_done=None if on_block_done is None else (lambda i: on_block_done(i) if i >= done else None))
    return packed


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _set_block_weights(block, adapter, prefix: str, i: int, packed: dict[str, PackedLinear]) -> None:
    linears = adapter.linears(block)
    with torch.no_grad():
        for name, p in packed.items():
            lin = linears[name[len(f"{prefix}.{i}."):]]
            lin.weight.copy_(reference.dequantize(p).to(lin.weight.device, lin.weight.dtype))


def train_block(block, init: dict[str, CompressedWeight], x: torch.Tensor, y: torch.Tensor, n_train: int,
                kwargs: dict, config: GQSAConfig, device, amp, seed: int = 0, dense: dict | None = None):
    """Train the block's compressed linears (one-shot results ``init``, applied in place) to map
    ``x[:n_train]`` to ``y[:n_train]``; early stopping and the kept epoch use ``x[n_train:]``.
    ``dense``: the linears' uncompressed weights, needed by ``config.bqpo_learn_mask``.

    Returns (``{name: CompressedWeight}`` of the kept epoch — applied to the block's linears —,
    statistics).
    """
    if not init:  # every linear of the block is skipped
        return {}, {"train_windows": n_train, "val_windows": x.shape[0] - n_train, "train_loss_before": 0.0,
                    "train_loss_after": 0.0, "val_loss_before": None, "val_loss_after": None, "epochs_run": 0,
                    "best_epoch": 0, "steps": 0, "early_stopped": False}
    linears = {n: block.get_submodule(n) for n in init}
    dtype = common.block_dtype(block)
    fqs = {n: FakeQuantLinear(init[n], lin.in_features, config.bits, lin.bias).to(device)
           for n, lin in linears.items()}
    # only the trained form stays on the device
    with common.training_swap(block, fqs, before_swap=lambda n, lin: lin.to("cpu")):
        groups = [
            {"params": [m.u for m in fqs.values()], "lr": config.bqpo_lr_weight},
            {"params": [m.gamma for m in fqs.values()], "lr": config.bqpo_lr_scale},
            {"params": [m.zero for m in fqs.values()], "lr": config.bqpo_lr_zero},
        ]
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(g["lr"] > 0)
        groups = [g for g in groups if g["lr"] > 0]
        n_val = x.shape[0] - n_train
        bs = config.bqpo_batch_size
        steps_per_epoch = math.ceil(n_train / bs)
        total = steps_per_epoch * config.bqpo_epochs
        st = {"train_windows": n_train, "val_windows": n_val}
        st["train_loss_before"] = _mse(block, x, y, range(n_train), bs, kwargs, device, dtype, amp)
        st["val_loss_before"] = _mse(block, x, y, range(n_train, x.shape[0]), bs, kwargs, device, dtype, amp) \
            if n_val else None
        best, best_epoch, epoch = st["val_loss_before"], 0, 0
        ramp = config.bqpo_gradual if groups and total else 0
        learn = config.bqpo_learn_mask if groups and total else 0
        energy = _input_energy(block, fqs, x, n_train, bs, kwargs, device, dtype, amp) if ramp or learn else None
        if learn:
            if distributed.active():  # DDP cannot drop the scores from its reduction when they freeze
                raise ValueError("bqpo_learn_mask runs in one process (not under torchrun)")
            for n, m in fqs.items():
                mask_learning.start(m, dense[n], energy[n])
            groups.append({"params": [m.score for m in fqs.values()], "lr": config.bqpo_lr_mask})
            st["mask_swaps"] = 0  # groups brought in by a step (as many went out)
            oneshot_masks = {n: m.mask.clone() for n, m in fqs.items()}
        if groups and total:
            trainer = common.Trainer(groups, total, best, lambda: _snapshot(fqs), lambda st_: _restore(fqs, st_),
                                     patience=config.bqpo_patience)
            gen = torch.Generator().manual_seed(seed)
            trained = distributed.wrap(block, device)  # DDP under torchrun, else the block itself
            for epoch in range(1, config.bqpo_epochs + 1):
                for idx in torch.randperm(n_train, generator=gen).split(bs):
                    if distributed.split_batches():
                        distributed_step(trained, x, y, idx, kwargs, device, dtype, amp)
                    else:
                        xb = x[idx].to(device, dtype)
                        yb = y[idx].to(device, torch.float32)
                        with amp():
                            out = calib.block_output(block, xb, kwargs)
                        loss = F.mse_loss(out.float(), yb)
                        loss.backward()
                    trainer.step()
                    if epoch <= learn:  # the straight-through top-k: the mask follows the scores
                        st["mask_swaps"] += sum(mask_learning.update(m, config.allocation) for m in fqs.values())
                if epoch == learn:  # the mask is final: frozen from here on
                    for m in fqs.values():
                        mask_learning.freeze(m)
                    kept = sum(int(m.mask.sum()) for m in fqs.values())
                    st["mask_moved"] = sum(int((m.mask & ~oneshot_masks[n]).sum()) for n, m in fqs.items()) / kept
                if epoch < learn:
                    continue
                if epoch <= ramp:  # gradual pruning: a sparser mask from the trained weights, frozen after the ramp
                    _remask(fqs, energy, config.sparsity if epoch == ramp else config.sparsity * epoch / ramp,
                            config.allocation)
                    if epoch < ramp:
                        continue
                v = _mse(block, x, y, range(n_train, x.shape[0]), bs, kwargs, device, dtype, amp) if n_val else None
                if epoch in (ramp, learn) and v is not None:  # the mask is final: select among epochs from here on
                    trainer.best = float("inf")
                if trainer.epoch_done(epoch, v):
                    break
            trainer.finish()
            best, best_epoch = trainer.best, trainer.best_epoch
        st.update(epochs_run=epoch, best_epoch=best_epoch, steps=epoch * steps_per_epoch,
                  early_stopped=bool(groups and n_val and 0 < epoch < config.bqpo_epochs),
                  val_loss_after=best if n_val else None)
        st["train_loss_after"] = _mse(block, x, y, range(n_train), bs, kwargs, device, dtype, amp)
        out = {}
        for n, m in fqs.items():
            cw = m.export()
            with torch.no_grad():
                if not torch.equal(cw.weight, m.weight()):
                    raise RuntimeError(f"{n}: exported codes do not reproduce the trained weight (a gqsa bug)")
            out[n] = cw
    with torch.no_grad():
        for n, lin in linears.items():
            lin.to(device)
            lin.weight.copy_(out[n].weight.to(lin.weight.dtype))
    return out, st


@torch.no_grad()
def _input_energy(block, fqs, x, n_train: int, bs: int, kwargs, device, dtype, amp) -> dict[str, torch.Tensor]:
    """``diag(XᵀX)`` of every trained linear's inputs on the training windows, ``[C, G]`` (zero-padded)."""
    sums, hooks = {}, []
    for n, m in fqs.items():
        def hook(mod, args, out, n=n):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[n] = sums.get(n, 0) + a.square().sum(0)
        hooks.append(m.register_forward_hook(hook))
    try:
        for i in range(0, n_train, bs):
            with amp():
                calib.block_output(block, x[i:i + bs].to(device, dtype), kwargs)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, m in fqs.items():
        c, g = m.mask.shape[1], m.group_size
        out[n] = torch.nn.functional.pad(sums[n], (0, c * g - sums[n].numel())).reshape(c, g)
    return out


@torch.no_grad()
def _remask(fqs, energy: dict, sparsity: float, allocation: str) -> None:
    """Choose every trained linear's mask again at ``sparsity``: the groups of the largest diagonal OBS
    saliency ``Σ w² · diag(XᵀX)`` of the fake-quantized weights (pruned groups included, as trained or
    as they were when pruned)."""
    for n, m in fqs.items():
        w = m.group_weights()  # [N, C, G]
        score = (w.square() * energy[n]).sum(-1)
        mask = prune.select_mask(score, sparsity, allocation) if sparsity > 0 else torch.ones_like(score, dtype=torch.bool)
        m.mask.copy_(mask[..., None])


def distributed_step(trained, x, y, idx: torch.Tensor, kwargs, device, dtype, amp) -> None:
    """Backward pass of this process's shares of the global batch ``idx`` (:func:`distributed.shares`):
    each share's summed squared error divided by the batch's element count and multiplied by the share's
    factor, so that the gradients, summed over the shares and averaged by DDP over the ranks, are the
    gradient of the whole batch's MSE."""
    for mine, factor in distributed.shares(idx):
        with amp():
            out = calib.block_output(trained, x[mine].to(device, dtype), kwargs)
        err = F.mse_loss(out.float(), y[mine].to(device, torch.float32), reduction="sum")
        (err * (factor / (len(idx) * out[0].numel()))).backward()


def _snapshot(fqs) -> dict:
    """The trainable tensors of the best epoch so far (kept on their device: a copy to CPU per epoch
    would cost more time than the 4 B per weight it saves)."""
    return {n: [t.detach().clone() for t in (m.u, m.gamma, m.zero, m.mask)] for n, m in fqs.items()}


@torch.no_grad()
def _restore(fqs, state) -> None:
    for n, m in fqs.items():
        for t, saved in zip((m.u, m.gamma, m.zero, m.mask), state[n]):
            t.copy_(saved)


@torch.no_grad()
def _mse(block, x, y, indices: range, bs: int, kwargs, device, dtype, amp) -> float:
    total, count = 0.0, 0
    for i in range(indices.start, indices.stop, bs):
        j = min(i + bs, indices.stop)
        with amp():
            out = calib.block_output(block, x[i:j].to(device, dtype), kwargs)
        total += F.mse_loss(out.float(), y[i:j].to(device, torch.float32), reduction="sum").item()
        count += out.numel()
    return total / max(count, 1)


def _log_line(i: int, n: int, s: dict) -> str:
    held = ""
    if s.get("val_loss_before") is not None:
        held = f", held-out {s['val_loss_before']:.4g} → {s['val_loss_after']:.4g}"
    stop = ", early stop" if s.get("early_stopped") else ""
    return (f"BQPO block {i + 1}/{n}: loss {s['train_loss_before']:.4g} → {s['train_loss_after']:.4g}{held} "
            f"(best epoch {s['best_epoch']}/{s['epochs_run']}{stop}), {s['seconds']:.1f} s, "
            f"{s['peak_memory_kind']} {common.fmt_bytes(s['peak_memory_bytes'])}")


def _fingerprint(model, blocks, config: GQSAConfig, tokens, n_train: int, batch_size: int, device) -> dict:
    """What must be equal for a resumed run to end bitwise as an uninterrupted one."""
    shapes = [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    return {
        "config": {k: v for k, v in config.to_dict().items() if k not in _NOT_BQPO},
        "calibration_sha256": tensor_sha256(tokens),
        "train_windows": n_train,
        "model_sha256": tensor_sha256(torch.tensor(list(json.dumps(shapes).encode()), dtype=torch.uint8),
                                      *blocks[0].parameters(), *blocks[-1].parameters()),
        "parameters": len(shapes),
        "blocks": len(blocks),
        "batch_size": batch_size,
        "device": device.type,
        "torch": torch.__version__,
    }
