import math

import pytest
import torch

from gqsa import format as F
from gqsa import prune, quant
from gqsa.kernels import reference


def correlated_inputs(k, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k))
    return x, x.T @ x / n


def test_hessian_saliency_is_the_exact_group_obs_error():
    """Removing group g and optimally re-fitting the rest of the row raises (w'−w)ᵀH(w'−w) by exactly the
    score: check against a brute-force constrained least-squares solve."""
    k, g, damp = 48, 16, 0.01
    _, h = correlated_inputs(k)
    w = torch.randn(3, k)
    score = prune.saliency(w, g, "hessian", h, damp)
    hd = prune.prepare_hessian(h, g, damp).double()
    for row in range(3):
        for grp in range(k // g):
            cols = torch.arange(grp * g, grp * g + g)
            rest = torch.tensor([c for c in range(k) if c not in cols.tolist()])
            # minimise d^T H d with d_g = -w_g: d_rest = -H_rr^{-1} H_rg d_g
            d = torch.zeros(k, dtype=torch.float64)
            d[cols] = -w[row, cols].double()
            d[rest] = -torch.linalg.solve(hd[rest][:, rest], hd[rest][:, cols] @ d[cols])
            assert score[row, grp].item() == pytest.approx((d @ hd @ d).item(), rel=1e-3)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_row_allocation_keeps_the_same_count_in_every_row(sparsity):
    score = torch.rand(32, 11)
    mask = prune.select_mask(score, sparsity, "row")
    counts = mask.sum(1)
    assert bool((counts == counts[0]).all()) and counts[0] == round((1 - sparsity) * 11)
    # and they are the top-scoring groups of the row
    kept_min = torch.where(mask, score, torch.inf).amin(1)
    dropped_max = torch.where(~mask, score, -torch.inf).amax(1)
    assert bool((kept_min > dropped_max).all())


def test_layer_allocation_keeps_the_global_top_groups():
    score = torch.rand(32, 11)
    mask = prune.select_mask(score, 0.5, "layer")
    assert mask.sum() == round(0.5 * 32 * 11)
    assert score[mask].min() > score[~mask].max()


@pytest.mark.parametrize("rows,n", [(16, 64), (16, 40), (32, 40), (128, 24)])
def test_block_allocation_keeps_the_same_columns_in_every_run_of_rows(rows, n):
    """blockR: rows b·R … b·R+R−1 keep the same group columns (the last run may be short), exactly
    round((1−S)·C) of them, the columns of the highest summed score of the run."""
    c, sparsity = 11, 0.5
    score = torch.rand(n, c, generator=torch.Generator().manual_seed(n + rows))
    mask = prune.select_mask(score, sparsity, f"block{rows}")
    assert mask.shape == (n, c)
    assert bool((mask.sum(1) == round((1 - sparsity) * c)).all())
    for b0 in range(0, n, rows):
        run = mask[b0:b0 + rows]
        assert bool((run == run[0]).all())
        summed = score[b0:b0 + rows].sum(0)
        assert summed[run[0]].min() > summed[~run[0]].max()
    assert prune.block_rows(f"block{rows}") == rows
    assert prune.block_rows("row") is None and prune.block_rows("block12") is None


@pytest.mark.parametrize("rows,n", [(16, 64), (16, 40), (32, 100)])
def test_cluster_allocation_shares_one_mask_per_cluster_and_keeps_more_than_blocks(rows, n):
    """clusterR: every row is in a cluster of exactly R rows (one shorter cluster when R ∤ N) whose rows
    keep the same group columns, row-balanced; rows are moved between clusters only when that keeps more
    of the score than the consecutive blocks do. Here the rows come from 4 hidden patterns, interleaved, so
    consecutive blocks mix them and clusters can separate them."""
    c, sparsity = 12, 0.5
    gen = torch.Generator().manual_seed(rows + n)
    patterns = torch.rand(4, c, generator=gen) ** 4
    score = patterns[torch.arange(n) % 4] + 0.01 * torch.rand(n, c, generator=gen)
    mask = prune.select_mask(score, sparsity, f"cluster{rows}")
    assign = prune.cluster_assignment(score, sparsity, rows)
    sizes = torch.bincount(assign).tolist()
    assert sorted(sizes, reverse=True) == [rows] * (n // rows) + ([n % rows] if n % rows else [])
    for b in range(len(sizes)):
        members = mask[assign == b]
        assert bool((members == members[0]).all())
    assert bool((mask.sum(1) == c // 2).all())
    block = prune.select_mask(score, sparsity, f"block{rows}")
    assert score[mask].sum() > score[block].sum()
    assert prune.cluster_rows(f"cluster{rows}") == rows and prune.cluster_rows(f"block{rows}") is None


def test_block_allocation_survives_the_refit_and_the_packed_form():
    """The default one-shot (cg20 re-fit) keeps the block mask, and the packed layer's rows of a run
    have identical column indices (what the block kernels detect)."""
    k, g, n = 128, 16, 48
    _, h = correlated_inputs(k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4))
    cw = prune.compress_weight(w, 4, g, 0.5, "hessian", "block16", hessian=h, mask_method="cg20")
    assert torch.equal(cw.mask, prune.select_mask(prune.saliency(w, g, "hessian", h), 0.5, "block16"))
    packed = F.pack(cw.codes, cw.scale, cw.zero, cw.mask, (n, k), 4, g)
    packed.validate()
    cols = [packed.col_idx[packed.row_ptr[r]:packed.row_ptr[r + 1]] for r in range(n)]
    for r in range(n):
        assert torch.equal(cols[r], cols[r - r % 16])
    assert torch.equal(reference.dequantize(packed), cw.weight)
    for method in ("iter1", "adaptive"):
        with pytest.raises(ValueError, match="allocation 'row'"):
            prune.compress_weight(w, 4, g, 0.5, "hessian", "block16", hessian=h, mask_method=method)
    rr = prune.compress_weight(w, 4, g, 0.5, "hessian", "block16", hessian=h, mask_method="rerank3")
    assert bool((rr.mask.reshape(3, 16, -1) == rr.mask[::16, None]).all())  # re-ranked, still block-uniform
    assert bool((rr.mask.sum(1) == k // g // 2).all())


@pytest.mark.parametrize("saliency", ["magnitude", "wanda", "hessian"])
@pytest.mark.parametrize("k", [64, 88])
def test_compressed_weight_is_exactly_its_packed_form(saliency, k):
    x, h = correlated_inputs(k)
    w = torch.randn(24, k)
    cw = prune.compress_weight(w, 4, 16, 0.5, saliency, "row", "mse", h)
    p = F.pack(cw.codes, cw.scale, cw.zero, cw.mask, (24, k), 4, 16)
    p.validate()
    assert torch.equal(reference.dequantize(p), cw.weight)
    dense_groups, _ = prune.group_view(cw.weight, 16)
    assert bool((dense_groups[~cw.mask] == 0).all())  # pruned groups are exactly zero


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_obs_compensation_beats_rounding_on_correlated_inputs(sparsity):
    x, h = correlated_inputs(128, seed=1)
    w = torch.randn(64, 128)
    mask = prune.select_mask(prune.saliency(w, 16, "hessian", h), sparsity, "row") if sparsity else \
        torch.ones(64, 8, dtype=torch.bool)
    out_err = {}
    for name, cw in (("rtn", prune.compress_rtn(w, mask, 4, 16, "mse", h)),
                     ("obs", prune.compress_obs(w, h, mask, 4, 16, "mse"))):
        out_err[name] = (x @ (cw.weight - w).T).square().mean().item()
    assert out_err["obs"] < 0.9 * out_err["rtn"]


def test_hessian_saliency_beats_magnitude_on_layer_output():
    x, h = correlated_inputs(128, seed=2)
    w = torch.randn(64, 128) * torch.linspace(0.2, 2, 128)  # columns of different scale
    errs = {s: (x @ (prune.compress_weight(w, 4, 16, 0.5, s, "row", "mse", h).weight - w).T).square().mean()
            for s in ("magnitude", "wanda", "hessian")}
    assert errs["hessian"] < errs["wanda"] <= errs["magnitude"] * 1.05


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="calibration statistics"):
        prune.saliency(torch.randn(4, 32), 16, "wanda")
    with pytest.raises(ValueError, match="unknown saliency"):
        prune.saliency(torch.randn(4, 32), 16, "random", torch.eye(32))
    with pytest.raises(ValueError, match="unknown allocation"):
        prune.select_mask(torch.rand(4, 2), 0.5, "block")
    with pytest.raises(ValueError, match="empty"):
        prune.compress_weight(torch.zeros(0, 32), 4, 16, 0.5, "magnitude")


def test_resolve_kept_is_the_least_squares_optimum_of_each_row():
    """w'_M = H_MM⁻¹ (H w)_M: the removed groups at zero, every kept weight re-fitted; equals the
    brute-force least-squares fit of the row's outputs X w on the kept inputs."""
    k, g = 64, 16
    x, h = correlated_inputs(k)
    w = torch.randn(5, k)
    mask = prune.select_mask(torch.rand(5, k // g), 0.5, "row")
    out, _ = prune.resolve_kept(w, h, mask, g)
    for r in range(5):
        cols = mask[r].repeat_interleave(g)
        fit = torch.linalg.lstsq(x[:, cols].double(), (x @ w[r]).double()[:, None]).solution[:, 0]
        assert torch.allclose(out[r, cols].double(), fit, atol=1e-3)
        assert bool((out[r, ~cols] == 0).all())


@pytest.mark.parametrize("method", ["iter1", "iter3", "cg10", "rerank1", "rerank3", "adaptive", "adaptive16"])
def test_mask_methods_are_row_balanced_and_beat_the_fixed_mask(method):
    k, g, n = 128, 16, 24
    x, h = correlated_inputs(k)
    x[:, 3] *= 10  # an outlier input
    h = x.T @ x / x.shape[0]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))

    def err(cw):
        return ((x @ (w - cw.weight).T) ** 2).sum().item()

    fixed = prune.compress_weight(w, 4, g, 0.5, "hessian", hessian=h)
    cw = prune.compress_weight(w, 4, g, 0.5, "hessian", hessian=h, mask_method=method)
    assert bool((cw.mask.sum(1) == k // g // 2).all())
    assert bool((cw.weight.reshape(n, -1, g)[~cw.mask] == 0).all())
    assert err(cw) < err(fixed)


def test_refit_keeps_the_layer_allocation_and_row_balanced_methods_refuse_it():
    k, g, n = 128, 16, 24
    _, h = correlated_inputs(k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    w[:4] *= 8  # rows of larger weights: the layer-wide ranking keeps more of their groups
    fixed = prune.compress_weight(w, 4, g, 0.5, "hessian", "layer", hessian=h, mask_method="fixed")
    cw = prune.compress_weight(w, 4, g, 0.5, "hessian", "layer", hessian=h, mask_method="cg10")
    assert torch.equal(cw.mask, fixed.mask)  # the same layer-wide mask, then the re-fit
    assert len(set(cw.mask.sum(1).tolist())) > 1 and cw.mask.sum() == n * (k // g) // 2
    for method in ("iter1", "adaptive"):
        with pytest.raises(ValueError, match="allocation 'row'"):
            prune.compress_weight(w, 4, g, 0.5, "hessian", "layer", hessian=h, mask_method=method)


def test_conjugate_gradient_refit_reaches_the_least_squares_optimum():
    k, g, n = 96, 16, 12
    x, h = correlated_inputs(k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    mask = prune.select_mask(prune.saliency(w, g, "hessian", h), 0.5, "row")
    swept = prune.compress_obs(w, h, mask, 4, g, quantize=False).weight
    exact, _ = prune.resolve_kept(w, prune.prepare_hessian(h, g, 0.01), mask, g)
    hd = prune.prepare_hessian(h, g, 0.01)

    def f(v):
        return float(torch.einsum("nk,kl,nl->", w - v, hd, w - v))

    refit = prune.refine_kept_cg(w, swept, h, mask, g, iters=30)
    assert bool((refit.reshape(n, -1, g)[~mask] == 0).all())
    assert f(exact) <= f(refit) <= f(exact) * 1.001 < f(swept)


def test_quant_aware_saliency_is_the_hessian_saliency_less_that_of_the_quantization_error():
    g = torch.Generator().manual_seed(0)
    # heavy-tailed weights: a group with one large weight quantizes its other weights coarsely
    w = torch.randn(32, 60, generator=g) * torch.randn(32, 60, generator=g).abs() ** 3
    x = torch.randn(200, 60, generator=g)
    h = x.T @ x / 200
    plain = prune.saliency(w, 16, "hessian", h)
    qa = prune.quant_aware_saliency(w, h, 16, 2)
    assert (qa < plain).all()  # a quantized group saves less than an exact one
    wg, valid = prune.group_view(w, 16)
    imp, _ = prune.group_view(h.diagonal()[None, :], 16)
    s, z = quant.init_params(wg, 2, "mse", valid=valid, importance=imp)
    err = (wg - quant.dequantize(quant.quantize(wg, s, z, 2), s, z)).reshape(32, -1)[:, :60]
    assert torch.allclose(plain - qa, prune.saliency(err, 16, "hessian", h), rtol=1e-4, atol=1e-6)
    # the ranking changes in some rows; qcgN keeps the target count in every row, by that ranking
    assert not torch.equal(prune.select_mask(qa, 0.5), prune.select_mask(plain, 0.5))
    cw = prune.compress_weight(w, 2, 16, 0.5, "hessian", hessian=h, mask_method="qcg5")
    assert (cw.mask.sum(1) == 2).all() and torch.equal(cw.mask, prune.select_mask(qa, 0.5))
