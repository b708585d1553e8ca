"""Per-layer checks of the baselines against closed forms, brute force and each other."""
from __future__ import annotations

import pytest
import torch

from gqsa import quant
from gqsa.baselines import (gptq_layer, magnitude_layer, nm_mask, parse_pattern, rtn_layer, sparsegpt_layer,
                            unstructured_mask, wanda_layer)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_is_exactly_n_of_m_and_keeps_the_largest(n, m):
    score = torch.randn(8, 64).abs()
    keep = nm_mask(score, n, m)
    blocks = keep.reshape(8, -1, m)
    assert bool((blocks.sum(-1) == n).all())
    # brute force: every kept score is >= every removed score of its block
    s = score.reshape(8, -1, m)
    kept_min = torch.where(blocks, s, torch.full_like(s, float("inf"))).amin(-1)
    dropped_max = torch.where(~blocks, s, torch.full_like(s, -1.0)).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_mask_partial_tail_block():
    keep = nm_mask(torch.randn(3, 10).abs(), 2, 4)
    assert keep[:, :8].reshape(3, 2, 4).sum(-1).eq(2).all() and keep[:, 8:].sum(1).eq(2).all()


def test_unstructured_mask_counts():
    score = torch.randn(16, 40)
    assert unstructured_mask(score, 0.25, "row").sum(1).eq(30).all()
    keep = unstructured_mask(score, 0.3, "layer")
    assert int(keep.sum()) == 640 - 192 and score[keep].min() >= score[~keep].max()


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("unstructured") is None
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


# ----------------------------------------------------------------------------- sparse baselines


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_patterns_are_exact(method, layer_problem):
    w, _, h = layer_problem
    if method == "magnitude":
        wp, keep = magnitude_layer(w, pattern=(2, 4))
    elif method == "wanda":
        wp, keep = wanda_layer(w, h, pattern=(2, 4))
    else:
        wp, keep = sparsegpt_layer(w, h, pattern=(2, 4))
    assert bool((keep.reshape(32, -1, 4).sum(-1) == 2).all())
    assert bool((wp[~keep] == 0).all())
    assert bool(((wp != 0).reshape(32, -1, 4).sum(-1) <= 2).all())


def test_magnitude_and_wanda_keep_the_original_values(layer_problem):
    w, _, h = layer_problem
    for wp, keep in (magnitude_layer(w, pattern=(2, 4)), wanda_layer(w, h, pattern=None, sparsity=0.5)):
        assert torch.equal(wp[keep], w[keep])
    _, keep = wanda_layer(w, h, pattern=None, sparsity=0.5)
    assert keep.sum(1).eq(32).all()  # Wanda compares within each output row


def test_wanda_uses_activation_norms():
    # two inputs, equal weights: the one with the larger activations must be kept
    w = torch.ones(4, 2)
    h = torch.diag(torch.tensor([1.0, 100.0]))
    _, keep = wanda_layer(w, h, pattern=(1, 2))
    assert keep[:, 1].all() and not keep[:, 0].any()


def _obs_sequential(w, h, prune_cols, damp=0.01):
    """Brute-force SparseGPT with a fixed mask: visit columns left to right; removing column j from
    the problem restricted to the unvisited columns j..K−1 is the OBS update with the inverse of that
    sub-Hessian, computed explicitly (float64)."""
    w = w.double().clone()
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    k = w.shape[1]
    for j in range(k):
        hinv = torch.linalg.inv(h[j:, j:])
        pruned = prune_cols[:, j]
        delta = -(w[:, j] / hinv[0, 0])[:, None] * hinv[0][None, :]
        w[pruned, j:] += delta[pruned]
        w[pruned, j] = 0.0
    return w


def test_sparsegpt_single_weight_matches_obs_closed_form(layer_problem):
    w, _, h = layer_problem
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, 0] = False  # remove the first input of every row
    got, keep = sparsegpt_layer(w, h, mask=mask)
    hd = h.double() + 0.01 * h.diagonal().mean().double() * torch.eye(64, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    want = w.double() - (w.double()[:, 0] / hinv[0, 0])[:, None] * hinv[0][None, :]  # OBS: δ = −w_q/[H⁻¹]_qq · H⁻¹_:,q
    assert torch.equal(keep, mask)
    assert got[:, 0].abs().max() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocksize", [128, 16, 7])
def test_sparsegpt_lazy_blocks_match_sequential_obs(layer_problem, blocksize):
    w, _, h = layer_problem
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(w.shape, generator=g) > 0.5
    got, _ = sparsegpt_layer(w, h, mask=mask, blocksize=blocksize, pattern=None)
    torch.testing.assert_close(got.double(), _obs_sequential(w, h, ~mask), rtol=1e-3, atol=1e-4)


def test_sparsegpt_with_its_mask_is_the_least_squares_optimum_for_one_row(layer_problem):
    # a row with one pruned weight at column 0: SparseGPT's update = the exact minimizer of the
    # output error over the kept weights (brute-force normal equations)
    w, x, h = layer_problem
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, 0] = False
    got, _ = sparsegpt_layer(w, h, mask=mask, damp=1e-6)
    xd, wd = x.double(), w.double()
    free = xd[:, 1:]
    sol = torch.linalg.lstsq(free, xd @ wd.T).solution.T  # [32, 63]
    torch.testing.assert_close(got[:, 1:].double(), sol, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pattern,sparsity", [((2, 4), 0.5), (None, 0.5), (None, 0.7)])
def test_sparsegpt_beats_wanda_beats_magnitude(layer_problem, pattern, sparsity, output_error):
    w, x, h = layer_problem
    err = {}
    for name, (wp, keep) in {
        "magnitude": magnitude_layer(w, sparsity, pattern),
        "wanda": wanda_layer(w, h, sparsity, pattern),
        "sparsegpt": sparsegpt_layer(w, h, sparsity, pattern),
    }.items():
        assert abs(1 - keep.float().mean().item() - sparsity) < 0.02
        err[name] = output_error(w, wp, x)
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]


# ----------------------------------------------------------------------------- quantization baselines


def _gptq_sequential(w, h, bits, g, order, static=None, damp=0.01):
    """Brute-force GPTQ (OBQ's update in a fixed order, eq. 2–3 of the GPTQ paper): quantize column
    ``q``, add ``−(w_q − quant(w_q)) / [H⁻¹]_qq · H⁻¹_{:,q}`` to the other unquantized columns, then
    remove ``q`` from ``H⁻¹`` by one step of Gaussian elimination. Group parameters: ``static``
    (precomputed), else min-max of the group's current weights when its first column comes up."""
    n, k = w.shape
    w = w.double().clone()
    hd = h.double() + damp * h.diagonal().mean().double() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    out = torch.zeros_like(w)
    scale = zero = None
    if static is not None:
        scale, zero = static
    for q in order:
        gi = q // g
        if static is None and q % g == 0:
            s, z = quant.minmax_params(w[:, q:q + g].float(), bits)
            scale_g, zero_g = s.double(), z.double()
        elif static is not None:
            scale_g, zero_g = scale[:, gi].double(), zero[:, gi].double()
        deq = quant.dequantize(quant.quantize(w[:, q:q + 1], scale_g, zero_g, bits), scale_g, zero_g)[:, 0]
        out[:, q] = deq
        e = (w[:, q] - deq) / hinv[q, q]
        w -= e[:, None] * hinv[:, q][None, :]
        w[:, q] = deq
        hinv = hinv - hinv[:, q:q + 1] @ hinv[q:q + 1, :] / hinv[q, q]
    return out


def test_gptq_matches_brute_force_obq_order(layer_problem):
    w, _, h = layer_problem
    got = gptq_layer(w, h, bits=4, group_size=16).weight
    want = _gptq_sequential(w, h, 4, 16, range(64))
    # float32 vs float64 may flip a rounding tie now and then; nearly all weights must agree exactly
    close = torch.isclose(got.double(), want, rtol=1e-4, atol=1e-5)
    assert close.float().mean() > 0.99


def test_gptq_act_order_matches_brute_force(layer_problem):
    w, _, h = layer_problem
    got = gptq_layer(w, h, bits=3, group_size=16, act_order=True)
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist()
    want = _gptq_sequential(w, h, 3, 16, order, static=(got.scale, got.zero))
    close = torch.isclose(got.weight.double(), want, rtol=1e-4, atol=1e-5)
    assert close.float().mean() > 0.99
    # static groups: the parameters are the min-max ones of the unquantized weights
    s, z = quant.minmax_params(w.reshape(32, 4, 16), 3)
    assert torch.equal(got.scale, s) and torch.equal(got.zero, z)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [16, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(layer_problem, bits, group_size, act_order, output_error):
    w, x, h = layer_problem
    e_gptq = output_error(w, gptq_layer(w, h, bits, group_size, act_order=act_order).weight, x)
    e_rtn = output_error(w, rtn_layer(w, bits, group_size).weight, x)
    assert e_gptq < e_rtn


def test_rtn_is_round_to_nearest_minmax():
    w = torch.randn(8, 48)
    cw = rtn_layer(w, 4, 16)
    s, z = quant.minmax_params(w.reshape(8, 3, 16), 4)
    assert torch.equal(cw.scale, s) and torch.equal(cw.zero, z)
    # every weight sits on the nearest level of its group's grid (brute force over all 16 levels)
    levels = quant.dequantize(torch.arange(16.0).expand(8, 3, 16), s, z)  # [8, 3, 16 levels]
    wg = w.reshape(8, 3, 16)
    nearest = (wg[..., None] - levels[..., None, :]).abs().amin(-1)
    got_err = (cw.weight.reshape(8, 3, 16) - wg).abs()
    torch.testing.assert_close(got_err, nearest, rtol=0, atol=1e-6)


def test_quant_baselines_pack_exactly(layer_problem):
    from gqsa.format import pack
    from gqsa.kernels import reference

    w, _, h = layer_problem
    for bits, cw in ((2, rtn_layer(w, 2, 32)), (3, gptq_layer(w, h, 3, 16, act_order=True)),
                     (4, gptq_layer(w, h, 4, 64))):
        p = pack(cw.codes, cw.scale, cw.zero, cw.mask, tuple(w.shape), bits, cw.codes.shape[-1])
        p.validate()
        assert p.sparsity == 0.0
        assert torch.equal(reference.dequantize(p), cw.weight)


def test_padding_when_k_is_not_a_multiple_of_g(output_error):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 40, generator=g)
    w = torch.randn(8, 40, generator=g)
    h = x.T @ x / 256
    for act in (False, True):
        cw = gptq_layer(w, h, 4, 16, act_order=act)
        assert cw.weight.shape == (8, 40) and torch.isfinite(cw.weight).all()
        assert output_error(w, cw.weight, x) < output_error(w, rtn_layer(w, 4, 16).weight, x)
    wp, keep = sparsegpt_layer(w, h, pattern=(2, 4))
    assert keep.reshape(8, 10, 4).sum(-1).eq(2).all()


def test_sparsegpt_two_four_int4_is_on_the_grid_and_beats_prune_then_round(layer_problem, output_error):
    from gqsa import quant
    from gqsa.baselines import sparsegpt_layer

    w, x, h = layer_problem
    wq, keep = sparsegpt_layer(w, h, pattern=(2, 4), bits=4, group_size=16)
    assert bool((keep.reshape(32, -1, 4).sum(-1) == 2).all()) and bool((wq[~keep] == 0).all())
    groups = wq.reshape(32, -1, 16)
    assert max(len(torch.unique(gv)) for gv in groups.reshape(-1, 16)) <= 16 + 1  # 16 levels and the pruned zeros
    # joint: every rounding error is compensated; better than SparseGPT 2:4 followed by round-to-nearest
    wp, keep_p = sparsegpt_layer(w, h, pattern=(2, 4))
    pg = wp.reshape(32, -1, 16)
    s, z = quant.init_params(pg, 4, "minmax")
    rounded = (quant.dequantize(quant.quantize(pg, s, z, 4), s, z).reshape(32, -1)) * keep_p
    fp = output_error(w, wp, x)
    assert fp < output_error(w, wq, x) < output_error(w, rounded, x)
