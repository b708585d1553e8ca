"""E2E-OQP: codes and mask frozen, only scales (and optionally zeros) trained; what is trained is what is packed."""
import pytest
import torch

from gqsa import GQSAConfig, GQSALinear, prune
from gqsa.oneshot import pack_weight
from gqsa.pipeline import compress_model
from gqsa.kernels import reference
from gqsa.stages.trainable import ScaleTrainableLinear


def packed_layer(k=40):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, k, generator=g), torch.randn(256, k, generator=g)
    cw = prune.compress_weight(w, 4, 16, 0.5, "hessian", hessian=x.T @ x / 256)
    return pack_weight(cw, (24, k), GQSAConfig(stages="oneshot"))


@pytest.mark.parametrize("train_zero", [False, True])
def test_trainable_scales_start_at_and_export_to_the_packed_weight_bitwise(train_zero):
    p = packed_layer()
    m = ScaleTrainableLinear(p, torch.randn(24), train_zero)
    with torch.no_grad():
        assert torch.equal(m.weight(), reference.dequantize(p))
        m.gamma.mul_(1 + 0.05 * torch.randn(m.gamma.shape))
        if train_zero:
            m.zero.add_(0.3 * torch.randn(m.zero.shape))
        out = m.export()
        out.validate()
        assert torch.equal(reference.dequantize(out), m.weight())  # float16 scales used in training = stored
        assert out.zeros.dtype == (torch.float16 if train_zero else torch.uint8)
        for t in ("row_ptr", "col_idx", "qweight"):  # codes and mask frozen
            assert torch.equal(getattr(out, t), getattr(p, t))
    x = torch.randn(5, 40)
    torch.testing.assert_close(m(x), GQSALinear.from_packed(out, m.bias)(x))


def test_only_scales_receive_gradients():
    m = ScaleTrainableLinear(packed_layer(), None, train_zero=True)
    m(torch.randn(5, 40)).square().sum().backward()
    assert m.gamma.grad.abs().sum() > 0 and m.zero.grad.abs().sum() > 0
    assert [n for n, q in m.named_parameters()] == ["gamma", "zero"]


@pytest.mark.parametrize("train_zero,accum,ckpt", [(False, 1, True), (True, 2, False)])
def test_e2e_keeps_codes_and_mask_and_never_worsens_the_heldout_loss(llama_factory, calib_tokens, train_zero, accum,
                                                                      ckpt):
    base = dict(bits=3, bqpo_epochs=2, bqpo_lr_weight=0.1, val_fraction=0.2)
    bqpo = compress_model(llama_factory(), GQSAConfig(stages="bqpo", **base), calib_tokens, "cpu", 4, False)
    stats, model = {}, llama_factory()
    got = compress_model(model, GQSAConfig(stages="bqpo+e2e", e2e_epochs=3, e2e_lr=1e-2, e2e_train_zero=train_zero,
                                           e2e_grad_accum=accum, e2e_batch_size=2, e2e_grad_checkpointing=ckpt,
                                           **base),
                         calib_tokens, "cpu", 4, False, stats=stats)
    e2e = stats["e2e"]
    assert len(e2e["epochs"]) == 3 and e2e["val_loss_after"] <= e2e["val_loss_before"]
    assert e2e["best_epoch"] > 0  # the scales did learn something here
    changed = 0
    for name, p in got.items():
        for t in ("row_ptr", "col_idx", "qweight"):
            assert torch.equal(getattr(p, t), getattr(bqpo[name], t)), f"{name}.{t}"
        assert p.zeros.dtype == (torch.float16 if train_zero else torch.uint8)
        changed += int(not torch.equal(p.scales, bqpo[name].scales))
        mod = model.get_submodule(name)
        assert isinstance(mod, GQSALinear) and torch.equal(mod.dequantize(), reference.dequantize(p))
    assert changed == len(got)
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored
    assert all("forward" not in vars(b) for b in model.model.layers)  # checkpointing wrappers removed


def test_gradient_checkpointing_gives_the_same_result(llama_factory, calib_tokens):
    outs = []
    for ckpt in (True, False):
        cfg = GQSAConfig(stages="bqpo+e2e", bqpo_epochs=0, e2e_epochs=1, e2e_lr=1e-2, e2e_grad_checkpointing=ckpt)
        outs.append(compress_model(llama_factory(), cfg, calib_tokens, "cpu", 4, False))
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name].scales, outs[1][name].scales, rtol=1e-3, atol=0)


def test_distillation_objective_lowers_the_heldout_kl_to_the_uncompressed_model(llama_factory, calib_tokens):
    from gqsa.stages.e2e import distillation_loss

    base = dict(bits=3, bqpo_epochs=2, bqpo_lr_weight=0.1, val_fraction=0.2, e2e_epochs=3, e2e_lr=1e-2)
    stats, model = {}, llama_factory()
    compress_model(model, GQSAConfig(stages="bqpo+e2e", e2e_loss="kd", **base), calib_tokens, "cpu", 4, False,
                   stats=stats)
    e2e = stats["e2e"]
    assert e2e["best_epoch"] > 0 and e2e["val_loss_after"] < e2e["val_loss_before"]
    # the held-out number is the KL of the kept model to the uncompressed one, on the held-out windows
    val = calib_tokens[-4:]
    with torch.no_grad():
        kl = distillation_loss(model, val, teacher=llama_factory()).item()
        assert distillation_loss(model, val, teacher=model).item() == pytest.approx(0.0, abs=1e-6)
    assert kl == pytest.approx(e2e["val_loss_after"], rel=1e-4)


def test_distillation_without_a_teacher_is_refused(llama_factory, calib_tokens):
    from gqsa.stages.e2e import run_e2e

    model = llama_factory()
    cfg = GQSAConfig(stages="bqpo+e2e", e2e_loss="kd", bqpo_epochs=0)
    packed = compress_model(model, GQSAConfig(stages="bqpo", bqpo_epochs=0), calib_tokens, "cpu", 4, False)
    with pytest.raises(ValueError, match="teacher"):
        run_e2e(model, packed, cfg, calib_tokens[:16], calib_tokens[16:], "cpu", False)
    with pytest.raises(ValueError, match="e2e_loss"):
        GQSAConfig(e2e_loss="mse")
