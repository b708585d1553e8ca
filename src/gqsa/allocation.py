"""Per-layer sparsity under a storage budget (``gqsa compress --target-bits B``).

Each compressed linear keeps the same number ``m`` of groups in every row (row-balanced, as the
kernels need), but ``m`` differs between linears: a greedy knapsack removes, one group per row at a
time, from the linear where it costs the least error per bit saved, until the packed size of all
compressed linears is at most ``B`` bits per weight.

The error of keeping ``m`` groups per row is measured on the uncompressed model (one calibration
pass, ``XᵀX`` of every linear's inputs): the sum over rows of the ``C − m`` smallest group OBS errors
``w_gᵀ [H⁻¹]_gg⁻¹ w_g`` (:func:`gqsa.prune.saliency`), relative to the layer's output energy
``tr(W H Wᵀ)`` — so every linear's loss counts in proportion to its own signal, as outlier-aware
layer-wise allocations (OWL) do. The costs are convex in the removed count, so the greedy choice is
the optimum of the relaxed problem.
"""
from __future__ import annotations

import heapq
import math

import torch

from . import prune


def packed_bits(rows: int, k: int, keep: int, bits: int, group_size: int) -> int:
    """Bits of one packed layer (``gqsa.format``): int32 row pointers, and per kept group an int16
    column index, the codes, an fp16 scale and a uint8 zero point."""
    return 32 * (rows + 1) + rows * keep * (16 + bits * group_size + 16 + 8)


def removal_costs(w: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01) -> torch.Tensor:
    """``cost[m]`` (``m = 0 … C``): relative output error of keeping the ``m`` best groups of every
    row of ``w`` ``[N, K]`` by the group OBS errors under ``hessian`` (``XᵀX/n``); ``cost[C] = 0``."""
    score = prune.saliency(w.float(), group_size, "hessian", hessian, damp)  # [N, C]
    ordered = score.sort(dim=1).values  # ascending: the first ones go first
    removed = torch.cat([torch.zeros(ordered.shape[0], 1), ordered.cumsum(1)], 1).sum(0)  # [C + 1]: j removed
    energy = torch.einsum("nk,kl,nl->", w.float(), hessian.float(), w.float()).clamp(min=1e-12)
    return (removed / energy).flip(0)  # index m = kept groups


def allocate(layers: dict[str, tuple[int, int, torch.Tensor]], bits: int, group_size: int, target_bits: float,
             min_keep: int = 1, max_deviation: float | None = 0.2) -> dict[str, int]:
    """Kept groups per row of every layer so that the packed size is at most ``target_bits`` per
    weight at the least total relative error.

    ``layers``: ``{name: (rows, k, cost)}`` with ``cost[m]`` the error of keeping ``m`` groups per
    row (``m = 0 … C``, non-increasing in ``m``). ``max_deviation``: every layer's sparsity stays
    within this distance of the uniform sparsity of the same size (OWL bounds its layer sparsities the
    same way: the first measurement without a bound sent some layers to 98%; None = unbounded) unless the
    bounded layers cannot reach the budget: then the greedy goes on without the bound.
    Raises ``ValueError`` when ``target_bits`` is below
    what ``min_keep`` groups per row take, or above the dense packed size (nothing to remove).
    """
    weights = sum(r * k for r, k, _ in layers.values())
    budget = target_bits * weights
    keep = {n: math.ceil(k / group_size) for n, (_, k, _) in layers.items()}

    def total() -> int:
        return sum(packed_bits(r, k, keep[n], bits, group_size) for n, (r, k, _) in layers.items())

    floor = sum(packed_bits(r, k, min_keep, bits, group_size) for r, k, _ in layers.values()) / weights
    if target_bits < floor:
        raise ValueError(f"--target-bits {target_bits:g} is below the smallest possible size "
                         f"({floor:.3f} bits/weight with {min_keep} group(s) kept per row)")
    dense = total() / weights
    if target_bits >= dense:
        raise ValueError(f"--target-bits {target_bits:g} needs no pruning: W{bits} G{group_size} dense is "
                         f"{dense:.3f} bits/weight; pass a smaller target or use --sparsity 0")

    hi = {n: math.ceil(k / group_size) for n, (_, k, _) in layers.items()}
    lo = {n: min_keep for n in layers}
    if max_deviation is not None:
        uniform = 1 - target_bits / (bits + 40 / group_size)  # the design formula's sparsity for the target
        for n, (_, k, _) in layers.items():
            c = math.ceil(k / group_size)
            lo[n] = min(c, max(min_keep, math.ceil(c * (1 - uniform - max_deviation) - 1e-9)))
            hi[n] = max(lo[n], min(c, math.floor(c * (1 - uniform + max_deviation) + 1e-9)))
            keep[n] = hi[n]

    def step(n):  # (error per bit saved of removing one more group per row, name)
        r, _, cost = layers[n]
        m = keep[n]
        return (float(cost[m - 1] - cost[m]) / (r * (bits * group_size + 40)), n)

    current = total()
    for bounds in (lo, {n: min_keep for n in layers}):
        # the second pass without the deviation bound: where every layer is narrow, the int32 row pointers weigh
        # more than the bound's design formula counts (stories260K, K = 64: half a bit per weight), and the
        # bounded layers alone cannot reach the budget, which is above the floor (checked) — the budget wins
        heap = [step(n) for n in layers if keep[n] > bounds[n]]
        heapq.heapify(heap)
        while current > budget and heap:
            _, n = heapq.heappop(heap)
            r, _, _ = layers[n]
            keep[n] -= 1
            current -= r * (bits * group_size + 40)
            if keep[n] > bounds[n]:
                heapq.heappush(heap, step(n))
    # the last removal may overshoot the budget: give back the groups that buy the most error per bit
    # while they still fit
    while True:
        fits = [n for n, (r, k, _) in layers.items()
                if keep[n] < hi[n] and current + r * (bits * group_size + 40) <= budget]
        if not fits:
            break
        n = max(fits, key=lambda n: float(layers[n][2][keep[n]] - layers[n][2][keep[n] + 1])
                / (layers[n][0] * (bits * group_size + 40)))
        keep[n] += 1
        current += layers[n][0] * (bits * group_size + 40)
    return keep


def sparsity_of(keep: int, k: int, group_size: int) -> float:
    """The ``--sparsity`` value whose row-balanced rounding keeps exactly ``keep`` of ``C`` groups."""
    c = math.ceil(k / group_size)
    return (c - keep) / c


@torch.no_grad()
def measure_costs(model, config, tokens: torch.Tensor, device, batch_size: int = 8
                  ) -> dict[str, tuple[int, int, torch.Tensor]]:
    """``{module name: (rows, k, removal_costs)}`` of every compressed linear, from one calibration
    pass of the block-wise driver through the uncompressed model (each block on the uncompressed outputs
    of the previous; the statistics are gathered while the driver propagates them)."""
    from .blockwise import HessianAccumulator, block_linear_groups, run_blocks
    from .models.adapters import get_adapter

    adapter = get_adapter(model)
    out, block_state = {}, {}

    def hook_linears(i, block, prefix, inputs):  # the driver's propagation fills the accumulators
        linears = adapter.linears(block)
        names = [n for group in block_linear_groups(adapter, block, prefix, i, config) for n in group]
        block_state.update(prefix=prefix, linears=linears, accs={n: HessianAccumulator(linears[n]) for n in names})

    def costs(i):
        for n, acc in block_state["accs"].items():
            h = acc.remove()
            w = block_state["linears"][n].weight.float()
            out[f"{block_state['prefix']}.{i}.{n}"] = (w.shape[0], w.shape[1],
                                                       removal_costs(w, h, config.group_size, config.damp).cpu())

    run_blocks(model, tokens, device, batch_size, hook_linears, desc="layer costs", progress=False, finish=costs)
    return out


def apply_target_bits(model, config, tokens: torch.Tensor, device, batch_size: int = 8) -> dict[str, float]:
    """Choose every compressed linear's sparsity for ``config.target_bits``; each linear gets a
    ``gqsa_sparsity`` attribute (read by :func:`gqsa.pipeline.oneshot_block`) and the choice is
    recorded in ``config.layer_sparsity``. Returns ``{module name: sparsity}``."""
    layers = measure_costs(model, config, tokens, device, batch_size)
    keep = allocate(layers, config.bits, config.group_size, config.target_bits)
    chosen = {}
    for name, (rows, k, _) in layers.items():
        s = sparsity_of(keep[name], k, config.group_size)
        model.get_submodule(name).gqsa_sparsity = s
        chosen[name] = round(s, 6)
    config.layer_sparsity = chosen
    return chosen
