"""Group saliency, group-mask selection, and one-shot group pruning + quantization of one layer.

Weights are viewed as groups: ``W[N, K]`` → ``[N, C, G]`` with ``C = ceil(K / G)``; a padded last
group carries zeros that never count (``valid`` marks the real elements).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import obs, quant


@dataclass
class CompressedWeight:
    """One layer's result: integer codes ``[N, C, G]``, ``scale``/``zero``/``mask`` ``[N, C]`` and the
    dequantized, masked weight ``weight`` ``[N, K]`` (float32), which the packed form reproduces
    exactly."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor


def group_view(w: torch.Tensor, group_size: int):
    """``[N, K]`` → (``[N, C, G]`` zero-padded, ``valid`` ``[C, G]`` bool)."""
    n, k = w.shape
    c = math.ceil(k / group_size)
    pad = c * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    valid = (torch.arange(c * group_size, device=w.device) < k).reshape(c, group_size)
    return w.reshape(n, c, group_size), valid


def saliency(w: torch.Tensor, group_size: int, method: str, hessian: torch.Tensor | None = None,
             damp: float = 0.01) -> torch.Tensor:
    """Importance of every group ``[N, C]`` (higher = keep).

    ``magnitude``: Σ|W| over the group; ``wanda``: Σ|W|·‖X_col‖₂ (‖X_col‖₂ = √diag(XᵀX));
    ``hessian``: the group OBS error ``w_gᵀ ([H⁻¹]_gg)⁻¹ w_g`` — the growth of the layer's squared
    output error when the group is removed and the rest of the row optimally compensates.
    """
    wg, _ = group_view(w.float(), group_size)
    if method == "magnitude":
        return wg.abs().sum(-1)
    if hessian is None:
        raise ValueError(f"'{method}' saliency needs calibration statistics (the layer's XᵀX)")
    if method == "wanda":
        norms, _ = group_view(hessian.diagonal().clamp(min=0).sqrt()[None, :], group_size)
        return (wg.abs() * norms).sum(-1)
    if method == "hessian":
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(prepare_hessian(hessian, group_size, damp)))
        c = wg.shape[1]
        blocks = hinv.reshape(c, group_size, c, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return torch.einsum("ncg,cgh,nch->nc", wg, torch.linalg.inv(blocks), wg)
    raise ValueError(f"unknown saliency '{method}': use magnitude, wanda or hessian")


def quant_aware_saliency(w: torch.Tensor, hessian: torch.Tensor, group_size: int, bits: int, init: str = "mse",
                         damp: float = 0.01) -> torch.Tensor:
    """The ``hessian`` saliency of every group less that of its own quantization error: what keeping the group
    saves, ``w_gᵀ([H⁻¹]_gg)⁻¹w_g − e_gᵀ([H⁻¹]_gg)⁻¹e_g`` with ``e_g = w_g − Q(w_g)`` (round to nearest with the
    group's ``init`` range, the error weighted by ``diag(XᵀX)`` as in :func:`compress_rtn`). ``[N, C]``."""
    n, k = w.shape
    wg, valid = group_view(w.float(), group_size)
    importance, _ = group_view(hessian.diagonal().float().clamp(min=0)[None, :], group_size)
    scale, zero = quant.init_params(wg, bits, init, valid=valid, importance=importance)
    err = (wg - quant.dequantize(quant.quantize(wg, scale, zero, bits), scale, zero)) * valid
    both = saliency(torch.cat([w.float(), err.reshape(n, -1)[:, :k]]), group_size, "hessian", hessian, damp)
    return both[:n] - both[n:]


def kept_groups(c: int, sparsity: float) -> int:
    """Groups a row of ``c`` keeps at ``sparsity`` under the row-balanced allocations: ``round((1−S)·C)``, at
    least one."""
    return min(c, max(1, round((1 - sparsity) * c)))


def select_mask(score: torch.Tensor, sparsity: float, allocation: str = "row") -> torch.Tensor:
    """Keep the highest-scoring groups: ``row`` keeps ``round((1−S)·C)`` groups in every row,
    ``layer`` keeps ``round((1−S)·N·C)`` groups anywhere in the layer (at least one per layer),
    ``blockR`` keeps ``round((1−S)·C)`` group columns per run of ``R`` consecutive rows (rows
    ``b·R … b·R+R−1``; the last run may be shorter), the same columns in every row of the run, ranked
    by the summed score of its rows: the pattern the block kernels read without per-row indices;
    ``clusterR`` the same for clusters of any ``R`` rows (:func:`cluster_assignment`)."""
    n, c = score.shape
    if allocation == "row":
        keep = kept_groups(c, sparsity)
        idx = score.topk(keep, dim=1).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    if allocation == "layer":
        keep = min(n * c, max(1, round((1 - sparsity) * n * c)))
        idx = score.flatten().topk(keep).indices
        return torch.zeros(n * c, dtype=torch.bool, device=score.device).scatter_(0, idx, True).reshape(n, c)
    rows = block_rows(allocation)
    if rows is not None:
        nb = math.ceil(n / rows)
        summed = torch.nn.functional.pad(score.float(), (0, 0, 0, nb * rows - n)).reshape(nb, rows, c).sum(1)
        return select_mask(summed, sparsity, "row").repeat_interleave(rows, dim=0)[:n]
    rows = cluster_rows(allocation)
    if rows is not None:
        assign = cluster_assignment(score.float(), sparsity, rows)
        summed = torch.zeros(int(assign.max()) + 1, c, device=score.device).index_add_(0, assign, score.float())
        return select_mask(summed, sparsity, "row")[assign]
    raise ValueError(f"unknown allocation '{allocation}': use row, layer, blockR or clusterR (R = 16, 32, 64 or 128)")


BLOCK_ROWS = (16, 32, 64, 128)


def block_rows(allocation: str) -> int | None:
    """``R`` of a ``blockR`` allocation (R in :data:`BLOCK_ROWS`), None for any other name."""
    if allocation.startswith("block") and allocation[5:].isdigit() and int(allocation[5:]) in BLOCK_ROWS:
        return int(allocation[5:])
    return None


def cluster_rows(allocation: str) -> int | None:
    """``R`` of a ``clusterR`` allocation, None for any other name."""
    if allocation.startswith("cluster") and allocation[7:].isdigit() and int(allocation[7:]) in BLOCK_ROWS:
        return int(allocation[7:])
    return None


def cluster_assignment(score: torch.Tensor, sparsity: float, rows: int, rounds: int = 8) -> torch.Tensor:
    """Rows → clusters of exactly ``rows`` rows (the last one may be short) that share one group mask.

    Two starts — runs of consecutive rows (``blockR``) and runs of the rows sorted by their own top
    groups (lexicographically, the layer's most important column first) — each improved by alternately
    giving every cluster the top columns of its summed score and moving every row to the cluster whose
    mask keeps most of its score (rows with the largest margin first, clusters filled to capacity) while
    the kept score grows; the start that ends with more kept score wins. Deterministic; never keeps less
    score than ``blockR``."""
    n, c = score.shape
    nb = math.ceil(n / rows)
    keep = kept_groups(c, sparsity)
    capacity = torch.full((nb,), rows, dtype=torch.long)
    capacity[-1] = n - rows * (nb - 1)

    def masks_and_kept(assign):
        summed = torch.zeros(nb, c, device=score.device).index_add_(0, assign, score)
        masks = torch.zeros(nb, c, device=score.device).scatter_(1, summed.topk(keep, dim=1).indices, 1.0)
        return masks, float((summed * masks).sum())

    def improve(assign):
        masks, kept = masks_and_kept(assign)
        for _ in range(rounds if nb > 1 else 0):
            gain = (score @ masks.T).cpu()  # [n, nb]: the score row r keeps in cluster b
            top2 = gain.topk(2, dim=1).values
            order = (top2[:, 0] - top2[:, 1]).argsort(descending=True, stable=True).tolist()
            left = capacity.tolist()
            full = torch.zeros(nb, dtype=torch.bool)
            new = [0] * n
            for r in order:  # most decided rows first, each to its best cluster with room (lowest index on ties)
                b = int(gain[r].masked_fill(full, -math.inf).argmax())
                new[r] = b
                left[b] -= 1
                if left[b] == 0:
                    full[b] = True
            new = torch.tensor(new, device=score.device)
            new_masks, new_kept = masks_and_kept(new)
            if new_kept <= kept:
                break
            assign, masks, kept = new, new_masks, new_kept
        return assign, kept

    consecutive = torch.arange(n, device=score.device) // rows
    own = select_mask(score, sparsity, "row")
    order = torch.arange(n, device=score.device)
    for col in score.sum(0).argsort(stable=True).tolist():  # least important first: the last sort decides most
        order = order[own[order, col].float().argsort(descending=True, stable=True)]
    by_pattern = torch.empty_like(consecutive).scatter_(0, order, consecutive)
    (a, kept_a), (b, kept_b) = improve(consecutive), improve(by_pattern)
    return a if kept_a >= kept_b else b


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``H⁻¹`` (``H`` positive definite): the row-by-row form of the
    inverse Hessian that GPTQ/SparseGPT-style column updates use."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def prepare_hessian(h: torch.Tensor, group_size: int, damp: float) -> torch.Tensor:
    """Pad ``H`` ``[K, K]`` to ``[C·G, C·G]`` and make it positive definite (dead inputs, padding and
    dampening get a unit/damped diagonal)."""
    k = h.shape[0]
    kp = math.ceil(k / group_size) * group_size
    hp = torch.zeros(kp, kp, dtype=torch.float32, device=h.device)
    hp[:k, :k] = h.float()
    diag = hp.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * diag[~dead].mean() if bool((~dead).any()) else damp
    return hp


def compress_rtn(w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int, init: str = "mse",
                 hessian: torch.Tensor | None = None) -> CompressedWeight:
    """Quantize the kept groups to the nearest level (with the ``init`` range search; the squared
    error is weighted by the input energy ``diag(XᵀX)`` when ``hessian`` is given)."""
    n, k = w.shape
    wg, valid = group_view(w.float(), group_size)
    importance = None
    if hessian is not None:
        importance, _ = group_view(hessian.diagonal().float().clamp(min=0)[None, :], group_size)
    scale, zero = quant.init_params(wg, bits, init, valid=valid, importance=importance)
    codes = quant.quantize(wg, scale, zero, bits)
    deq = quant.dequantize(codes, scale, zero) * mask[..., None]
    return CompressedWeight(codes, scale, zero, mask, deq.reshape(n, -1)[:, :k])


def compress_obs(w: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int,
                 init: str = "mse", damp: float = 0.01, blocksize: int = 128, adaptive_sparsity: float | None = None,
                 quantize: bool = True) -> CompressedWeight:
    """Prune the masked-out groups and quantize the kept ones column by column, spreading each
    column's error over the columns not yet processed through the inverse Hessian (SparseGPT's
    joint prune+quantize loop, GPTQ's lazy block updates), with the group mask held fixed.

    A group's scale and zero point are set when the loop reaches its first column, from the weights
    as compensated so far.
    """
    n, k = w.shape
    g = group_size
    wg, valid = group_view(w.float(), g)
    c = wg.shape[1]
    kp = c * g
    W = wg.reshape(n, kp).clone()
    H = prepare_hessian(hessian, g, damp)
    dead = hessian.diagonal()[:k] <= 0
    W[:, :k][:, dead] = 0
    importance = H.diagonal().clone()
    hinv = upper_cholesky_of_inverse(H)
    colmask = mask.repeat_interleave(g, dim=1).float()
    codes, out = torch.zeros(n, kp, device=w.device), torch.zeros(n, kp, device=w.device)
    scale, zero = torch.zeros(n, c, device=w.device), torch.zeros(n, c, device=w.device)

    def block(i1, i2, w1, h1):
        if adaptive_sparsity is not None:
            mask[:, i1 // g:i2 // g] = _adaptive_block_mask(w1, h1, g, adaptive_sparsity)
            colmask[:, i1:i2] = mask[:, i1 // g:i2 // g].repeat_interleave(g, dim=1).float()

    def column(col, i, w1):
        if col % g == 0 and quantize:  # (a prune-only sweep needs no quantizer)
            gi = col // g
            s, z = quant.init_params(w1[:, i:i + g], bits, init, valid=valid[gi], importance=importance[col:col + g])
            scale[:, gi], zero[:, gi] = s, z
        if quantize:
            s, z = scale[:, col // g], zero[:, col // g]
            q = quant.quantize(w1[:, i:i + 1], s, z, bits)[:, 0]
            deq = quant.dequantize(q[:, None], s, z)[:, 0] * colmask[:, col]
            codes[:, col] = q
        else:
            deq = w1[:, i] * colmask[:, col]
        out[:, col] = deq
        return deq

    obs.sweep(W, hinv, max(g, blocksize // g * g), column, block)
    return CompressedWeight(codes.reshape(n, c, g), scale, zero, mask, out[:, :k].clone())


def _adaptive_block_mask(w1: torch.Tensor, h1: torch.Tensor, g: int, sparsity: float) -> torch.Tensor:
    """Kept groups of one lazy block ``[N, B]`` chosen from the weights as compensated so far: each
    group's OBS error ``‖U_gg⁻ᵀ w_g‖²`` with ``U_gg`` its diagonal block of the Cholesky factor of
    ``H⁻¹`` (the inverse Hessian of the columns not yet processed), ``round((1−S)·B)`` kept per row."""
    n, width = w1.shape
    b = width // g
    blocks = torch.stack([h1[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(b)])  # [B, g, g] upper
    x = torch.linalg.solve_triangular(blocks.transpose(1, 2), w1.reshape(n, b, g).permute(1, 2, 0), upper=False)
    score = x.square().sum(1).T  # [N, B]
    return select_mask(score, sparsity, "row")


def compress_weight(w: torch.Tensor, bits: int, group_size: int, sparsity: float, saliency_method: str,
                    allocation: str = "row", init: str = "mse", hessian: torch.Tensor | None = None,
                    damp: float = 0.01, mask_method: str = "fixed", quantize: bool = True) -> CompressedWeight:
    """One-shot GQSA of one weight matrix: rank groups, fix the mask, quantize what is kept."""
    if w.numel() == 0:
        raise ValueError(f"cannot compress an empty weight of shape {list(w.shape)}")
    if saliency_method == "hessian" and sparsity > 0 and mask_method != "fixed":
        return _compress_obs_masked(w, hessian, bits, group_size, sparsity, init, damp, mask_method, quantize,
                                    allocation)
    score = saliency(w, group_size, saliency_method, hessian, damp)
    mask = select_mask(score, sparsity, allocation) if sparsity > 0 else torch.ones_like(score, dtype=torch.bool)
    if saliency_method == "hessian":
        return compress_obs(w, hessian, mask, bits, group_size, init, damp, quantize=quantize)
    return compress_rtn(w, mask, bits, group_size, init, hessian)


def _compress_obs_masked(w, hessian, bits, g, sparsity, init, damp, mask_method, quantize, allocation="row"):
    n, k = w.shape
    if allocation != "row" and not mask_method.startswith(("cg", "qcg", "rerank")):
        raise ValueError(f"mask '{mask_method}' keeps the same number of groups in every row: it needs "
                         f"allocation 'row', not '{allocation}' (or use mask 'fixed', 'cgN' or 'rerankN')")
    c = math.ceil(k / g)
    if mask_method.startswith("adaptive"):
        width = int(mask_method[len("adaptive"):] or 8) * g
        mask = torch.ones(n, c, dtype=torch.bool, device=w.device)
        return compress_obs(w, hessian, mask, bits, g, init, damp, blocksize=width, adaptive_sparsity=sparsity,
                            quantize=quantize)
    if mask_method.startswith("iter"):  # iterN: N rounds of prune part / exact re-solve / re-rank
        steps = int(mask_method[len("iter"):] or 1)
        wq, mask = iterative_group_prune(w, hessian, g, sparsity, steps, damp)
        return compress_obs(wq, hessian, mask, bits, g, init, damp, quantize=quantize)
    if mask_method.startswith(("cg", "qcg")):  # cgN: fixed mask, OBS sweep, then N CG steps of the re-fit
        iters = int(mask_method.lstrip("q")[2:] or 20)
        score = saliency(w, g, "hessian", hessian, damp) if mask_method.startswith("cg") else \
            quant_aware_saliency(w, hessian, g, bits, init, damp)
        mask = select_mask(score, sparsity, allocation)
        pruned = compress_obs(w, hessian, mask, bits, g, init, damp, quantize=False).weight
        refit = refine_kept_cg(w, pruned, hessian, mask, g, iters, damp)
        return compress_obs(refit, hessian, mask, bits, g, init, damp, quantize=quantize)
    if mask_method.startswith("rerank"):  # rerankN: N rounds of (rank on the re-fitted weights, prune, CG re-fit)
        rounds = int(mask_method[len("rerank"):] or 2)
        refit = w.float()
        for step in range(1, rounds + 1):
            score = saliency(refit, g, "hessian", hessian, damp)
            mask = select_mask(score, sparsity if step == rounds else sparsity * step / rounds, allocation)
            start = refit * mask.repeat_interleave(g, dim=1)[:, :k]
            refit = refine_kept_cg(w, start, hessian, mask, g, 20, damp)
        return compress_obs(refit, hessian, mask, bits, g, init, damp, quantize=quantize)
    raise ValueError(f"unknown mask method '{mask_method}'")


def refine_kept_cg(w: torch.Tensor, start: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, g: int,
                   iters: int = 20, damp: float = 0.01) -> torch.Tensor:
    """Approach :func:`resolve_kept`'s least-squares kept weights from ``start`` (e.g. the OBS sweep's
    pruned weights) by ``iters`` steps of Jacobi-preconditioned conjugate gradients on every row's
    ``(x − w)ᵀ H (x − w)`` with the removed groups held at zero: one ``[N, K] × [K, K]`` product per
    step instead of a factorization per row. The objective never increases."""
    n, k = w.shape
    H = prepare_hessian(hessian, g, damp)
    kp = H.shape[0]
    pad = kp - k
    W = torch.nn.functional.pad(w.float(), (0, pad))
    X = torch.nn.functional.pad(start.float(), (0, pad))
    dead = torch.nn.functional.pad(hessian.diagonal() <= 0, (0, pad), value=True)
    W[:, dead] = 0
    m = mask.repeat_interleave(g, dim=1).float() * (~dead).float()
    X = X * m
    pinv = 1.0 / H.diagonal()
    r = -((X - W) @ H) * m  # minus the gradient (halved)
    z = r * pinv
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    for _ in range(iters):
        hp = (p @ H) * m
        php = (p * hp).sum(1, keepdim=True)
        alpha = torch.where(php > 0, rz / php.clamp(min=1e-30), torch.zeros_like(php))
        X = X + alpha * p
        r = r - alpha * hp
        z = r * pinv
        rz_new = (r * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp(min=1e-30), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return X[:, :k]


def _kept_index(mask: torch.Tensor, g: int) -> torch.Tensor:
    """Column indices ``[N, m·g]`` of the kept groups of every row (rows keep the same count)."""
    n, c = mask.shape
    gidx = mask.float().argsort(dim=1, descending=True, stable=True)[:, : int(mask[0].sum())]
    gidx = gidx.sort(dim=1).values
    return (gidx[..., None] * g + torch.arange(g, device=mask.device)).reshape(n, -1)


def resolve_kept(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, g: int, chunk: int = 256,
                 with_saliency: bool = False):
    """The least-squares optimal kept weights of every row: ``argmin (w − w')ᵀ H (w − w')`` with the
    removed groups of ``w'`` at zero, i.e. ``w'_M = H_MM⁻¹ (H w)_M`` (all kept groups compensate, not
    only those after the removed ones). ``w`` ``[N, Kp]``, ``h`` ``[Kp, Kp]`` (damped, padded),
    ``mask`` ``[N, C]`` row-balanced. With ``with_saliency``, also each kept group's OBS error
    ``w'_gᵀ [(H_MM)⁻¹]_gg⁻¹ w'_g`` (removed groups score 0)."""
    n, kp = w.shape
    c = mask.shape[1]
    out = torch.zeros_like(w)
    sal = torch.zeros(n, c, device=w.device)
    hw = w @ h
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        m = mask[r0:r1]
        idx = _kept_index(m, g)  # [r, M]
        a = h[idx[:, :, None], idx[:, None, :]]
        b = hw[r0:r1].gather(1, idx)
        chol = torch.linalg.cholesky(a)
        x = torch.cholesky_solve(b[..., None], chol)[..., 0]
        out[r0:r1].scatter_(1, idx, x)
        if with_saliency:
            ainv = torch.cholesky_inverse(chol)
            mk = idx.shape[1] // g
            blocks = ainv.reshape(-1, mk, g, mk, g).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [r, mk, g, g]
            xg = x.reshape(-1, mk, g)
            s = torch.einsum("rkg,rkgh,rkh->rk", xg, torch.linalg.inv(blocks), xg)
            gi = idx[:, ::g] // g
            sal[r0:r1].scatter_(1, gi, s)
    return out, sal


def iterative_group_prune(w: torch.Tensor, hessian: torch.Tensor, g: int, sparsity: float, steps: int,
                          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Group pruning in ``steps`` rounds, each removing an equal share of the target in every row by
    the OBS group error of the weights as re-solved after the previous round (``resolve_kept``), then
    re-solving the kept weights. Returns (the pruned, re-fitted weight ``[N, K]``, the kept mask ``[N, C]``)."""
    n, k = w.shape
    wg, _ = group_view(w.float(), g)
    c = wg.shape[1]
    W = wg.reshape(n, -1).clone()
    H = prepare_hessian(hessian, g, damp)
    dead = hessian.diagonal()[:k] <= 0
    W[:, :k][:, dead] = 0
    target = kept_groups(c, sparsity)
    mask = torch.ones(n, c, dtype=torch.bool, device=w.device)
    score = saliency(W[:, :k], g, "hessian", hessian, damp)
    for step in range(1, steps + 1):
        keep = round(c - (c - target) * step / steps)
        score = torch.where(mask, score, torch.full_like(score, -1.0))
        idx = score.topk(keep, dim=1).indices
        mask = torch.zeros_like(mask).scatter_(1, idx, True)
        W, score = resolve_kept(W, H, mask, g, with_saliency=step < steps)
    return W[:, :k], mask
