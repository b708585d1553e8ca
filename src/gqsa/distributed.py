"""Data-parallel compression on ``torch.distributed`` (``torchrun --nproc-per-node N gqsa compress …``).

Every rank holds the current block and all calibration activations (the one-shot step and the
activation propagation run on every rank, bit for bit alike); the *training* of both stages is split:
each optimizer step's global batch of windows — the same batches, in the same order, as a one-process
run with that batch size draws — is divided among the ranks (rank ``r`` takes windows ``r, r+N, …`` of
the batch), each rank back-propagates its share with the loss weighted by its share of the batch, and
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients, so every rank takes the
optimizer step of the whole batch. The results differ from a one-process run only by the order of
floating-point sums (the gradient of a batch is the all-reduced sum of per-rank parts), and are
identical on all ranks (checked after every block). Rank 0 alone writes the work folder and the
checkpoint and shows progress.

One process (no ``WORLD_SIZE`` in the environment, no process group) is the default and runs the
original code paths: its results do not change.

Reproducing an N-rank run in one process: with ``GQSA_SIMULATE_RANKS=N`` a one-process run splits every
training batch into the N shares the ranks would take, back-propagates them one after the other in rank
order and lets the gradients add up. Each share is computed with the same shapes as on its rank, the
gradients of a batch are summed in the same order as the all-reduce sums them (for N = 2 a single,
commutative addition; the loss factors differ by the power of two that DDP divides out again, which is
exact), so the result is bit for bit the ``torchrun --nproc-per-node N`` result on the same kind of
device — on any machine, whatever its BLAS does with other shapes. This is how a multi-GPU result is
checked or debugged on one device, and how the test suite compares a 2-rank run with one process.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when started by ``torchrun`` (or another launcher setting ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None) -> torch.device:
    """Initialize the process group from the launcher's environment (``nccl`` on CUDA, ``gloo`` on
    CPU) and return this rank's device (``cuda:LOCAL_RANK`` for ``cuda``)."""
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if want.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible; start at most "
                               f"that many processes per node (torchrun --nproc-per-node)")
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo",
                                device_id=want if want.type == "cuda" else None)
    return want


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def share(idx: torch.Tensor) -> torch.Tensor:
    """This rank's windows of one global batch ``idx``: ``idx[rank::world]``."""
    return idx[rank()::world_size()] if active() else idx


SIMULATE_ENV = "GQSA_SIMULATE_RANKS"


def simulated_ranks() -> int:
    """N ≥ 1: the number of ranks a one-process run reproduces (``GQSA_SIMULATE_RANKS``, module docstring);
    1 under a real process group and by default."""
    raw = os.environ.get(SIMULATE_ENV, "").strip()
    if active() or not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{SIMULATE_ENV}={raw!r}: expected a whole number of ranks ≥ 1 (or unset)")
    return int(raw)


def split_batches() -> bool:
    """True when training steps go through :func:`shares` (a real process group or a simulated one)."""
    return active() or simulated_ranks() > 1


def shares(idx: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The pieces of the global batch ``idx`` that this process back-propagates, each with the factor its
    loss is multiplied by on top of the whole batch's normalization:

    * under a process group, this rank's share with factor ``world`` (DDP divides the summed gradients
      by the world size again); a rank without a window in the batch gets ``idx[:1]`` with factor 0 (it
      must still take part in the all-reduce);
    * with ``N`` simulated ranks, the N shares in rank order with factor 1, empty ones left out;
    * otherwise the whole batch with factor 1.
    """
    if active():
        mine = share(idx)
        return [(mine, world_size())] if len(mine) else [(idx[:1], 0)]
    n = simulated_ranks()
    return [(part, 1) for part in (idx[r::n] for r in range(n)) if len(part)]


def sum_over_ranks(value: float, device) -> float:
    """``value`` summed over the ranks (float64), or itself in one process."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` under DistributedDataParallel (gradients of its trainable parameters averaged
    over the ranks), or itself in one process."""
    if not active():
        return module
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # The buffers (packed codes, masks, rotary tables) are equal on every rank: never synced, neither
    # at construction nor per forward (gloo cannot even send the int16 col_idx). torch 2.13 deprecates
    # broadcast_buffers for forward_sync_buffers, which still syncs at construction: keep the old one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)


def on_main(fn: Callable[[], object]):
    """Run ``fn`` on rank 0 only; its exception (if any) is raised on every rank, so that no rank
    waits forever for one that failed. Returns ``fn``'s result on rank 0, None elsewhere."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    msg = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(msg, src=0)
    if error is not None:
        raise error
    if msg[0] is not None:
        raise RuntimeError(f"rank 0 failed: {msg[0]}")
    return result


def owner(k: int) -> int:
    """The rank that computes the ``k``-th of several independent jobs (round robin)."""
    return k % world_size()


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int, device) -> dict[str, torch.Tensor]:
    """``tensors`` of rank ``src`` on every rank (others pass None), on ``device``."""
    if not active():
        return tensors
    meta = [{k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} if rank() == src else None]
    dist.broadcast_object_list(meta, src=src, device=device if torch.device(device).type == "cuda" else None)
    out = {}
    for k, (shape, dtype) in meta[0].items():
        # sent as raw bytes: not every backend sends every dtype (gloo: no int16, bool)
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        wire = (tensors[k].to(device).contiguous().reshape(-1).view(torch.uint8) if rank() == src
                else torch.empty(n, dtype=torch.uint8, device=device))
        dist.broadcast(wire, src=src)
        out[k] = wire.view(dtype).reshape(shape)
    return out


def check_same(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise when ``tensors`` differ between ranks (their sha256 is compared): the ranks must have
    taken the same steps."""
    if not active():
        return
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digests = [None] * world_size()
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what}: the ranks' results differ ({', '.join(d[:12] for d in digests)}); "
                           f"the ranks must run the same code, data and settings")
