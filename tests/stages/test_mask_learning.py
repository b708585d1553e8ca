"""``bqpo_learn_mask``: learnable group scores with a straight-through top-k mask during BQPO."""
import pytest
import torch

from gqsa import GQSAConfig, prune, quant
from gqsa.kernels import reference
from gqsa.pipeline import compress_model
from gqsa.stages import mask_learning
from gqsa.stages.trainable import FakeQuantLinear


def _layer(n=24, k=40, sparsity=0.5):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(256, k, generator=g)
    h = x.T @ x / 256
    energy, _ = prune.group_view(h.diagonal()[None, :], 16)
    return w, x, prune.compress_weight(w, 4, 16, sparsity, "hessian", hessian=h), energy[0]


def test_initial_scores_select_the_oneshot_mask_and_training_starts_at_the_oneshot_weight():
    w, _, cw, energy = _layer()
    m = FakeQuantLinear(cw, 40, 4)
    mask_learning.start(m, w, energy)
    assert torch.equal(prune.select_mask(m.score.detach(), m.sparsity, "row"), cw.mask)
    assert mask_learning.update(m, "row") == 0
    with torch.no_grad():
        assert torch.equal(m.weight(), cw.weight)
    # removed groups restart from the uncompressed weights (within half a quantization step)
    wg, _ = prune.group_view(w, 16)
    latent = (m.u * m.s0[..., None])[~cw.mask]
    assert (latent - wg[~cw.mask]).abs().max() < 1e-5


def test_scores_get_the_gradient_of_their_mask_entry_and_the_forward_value_is_the_hard_mask():
    w, x, cw, energy = _layer()
    m = FakeQuantLinear(cw, 40, 4)
    mask_learning.start(m, w, energy)
    out = m(x[:8])
    with torch.no_grad():
        assert torch.equal(out, x[:8] @ cw.weight.T)
    grad_w = torch.randn(8, 24, generator=torch.Generator().manual_seed(5))
    (out * grad_w).sum().backward()
    e = m.export()
    every_group = quant.dequantize(e.codes, e.scale, e.zero)  # [N, C, G], removed groups unmasked
    dldw, _ = prune.group_view(grad_w.T @ x[:8], 16)
    assert torch.allclose(m.score.grad, (dldw * every_group).sum(-1), rtol=1e-4, atol=1e-5)
    assert m.score.grad[~cw.mask].abs().min() > 0  # removed groups can come back
    assert m.u.grad[~cw.mask].abs().max() == 0  # their latent weights wait


def test_freeze_stops_the_score_gradient():
    w, x, cw, energy = _layer()
    m = FakeQuantLinear(cw, 40, 4)
    mask_learning.start(m, w, energy)
    mask_learning.freeze(m)
    m(x[:4]).sum().backward()
    assert m.score.grad is None and m.u.grad is not None


@pytest.mark.parametrize("allocation", ["row", "block16"])
def test_learned_mask_is_row_balanced_at_the_target_moves_and_is_deterministic(llama_factory, calib_tokens,
                                                                              allocation):
    cfg = dict(bits=4, sparsity=0.5, allocation=allocation)
    one = compress_model(llama_factory(), GQSAConfig(stages="bqpo", bqpo_epochs=4, **cfg), calib_tokens,
                         "cpu", 4, False)
    runs = []
    for _ in range(2):
        stats, model = {}, llama_factory()
        got = compress_model(model, GQSAConfig(stages="bqpo", bqpo_epochs=4, bqpo_learn_mask=2, bqpo_lr_mask=0.2,
                                               **cfg), calib_tokens, "cpu", 4, False, stats=stats)
        runs.append(got)
    got = runs[0]
    moved = 0
    for name, p in got.items():
        counts = (p.row_ptr[1:] - p.row_ptr[:-1]).unique().tolist()
        assert counts == [round(0.5 * p.n_group_cols)], name
        moved += not torch.equal(p.col_idx, one[name].col_idx)
        if allocation == "block16":
            cols = p.col_idx.reshape(p.shape[0], -1)
            for b in range(0, p.shape[0], 16):
                assert (cols[b:b + 16] == cols[b]).all(), name
        for t, v in p.tensors().items():
            assert torch.equal(v, getattr(runs[1][name], t)), f"{name}.{t}"
    assert moved > 0
    assert all(s["mask_swaps"] > 0 and 0 < s["mask_moved"] < 0.5 and s["best_epoch"] >= 2 for s in stats["bqpo"])
    for name, p in runs[1].items():
        assert torch.equal(model.get_submodule(name).dequantize(), reference.dequantize(p))


def test_learn_mask_settings_are_checked():
    with pytest.raises(ValueError, match="bqpo_learn_mask"):
        GQSAConfig(bqpo_epochs=3, bqpo_learn_mask=3)
    with pytest.raises(ValueError, match="bqpo_learn_mask"):
        GQSAConfig(bqpo_learn_mask=-1)
    with pytest.raises(ValueError, match="bqpo_learn_mask"):
        GQSAConfig(bqpo_epochs=6, bqpo_learn_mask=2, bqpo_gradual=2)
    with pytest.raises(ValueError, match="bqpo_lr_mask"):
        GQSAConfig(bqpo_lr_mask=-0.1)


def test_cli_options_reach_the_config():
    from gqsa.commands.compress import given_options
    from gqsa.workflow import gqsa_config

    kw = given_options(["--preset", "fast", "--bqpo-learn-mask", "2", "--bqpo-lr-mask", "0.1", "--mask", "qcg10"])
    cfg = gqsa_config(**{k: v for k, v in kw.items() if k in ("preset", "mask", "bqpo_learn_mask", "bqpo_lr_mask")})
    assert (cfg.bqpo_learn_mask, cfg.bqpo_lr_mask, cfg.mask, cfg.bqpo_epochs) == (2, 0.1, "qcg10", 5)
    assert gqsa_config().bqpo_learn_mask == 0
