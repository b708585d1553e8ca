import pytest
import torch

from gqsa import quant


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("g", quant.SUPPORTED_GROUP_SIZES)
def test_pack_unpack_round_trip(bits, g):
    q = torch.randint(0, 2**bits, (7, 3, g), dtype=torch.uint8)
    packed = quant.pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3, g * bits // 8)
    assert torch.equal(quant.unpack_codes(packed, bits, g), q)


def test_four_bit_layout_low_nibble_is_even_element():
    q = torch.tensor([[1, 2] * 8], dtype=torch.uint8)
    assert quant.pack_codes(q, 4)[0, 0].item() == 0x21


def test_three_bit_stream_is_little_endian():
    q = torch.zeros(1, 16, dtype=torch.uint8)
    q[0, 0], q[0, 2] = 5, 7  # bits 0-2 = 101, bits 6-8 = 111
    assert quant.pack_codes(q, 3)[0, :2].tolist() == [0b11000101, 0b1]


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_params_are_storable_and_codes_in_range(bits, method):
    w = torch.randn(64, 16) * 3
    s, z = quant.init_params(w, bits, method)
    assert torch.equal(s, s.half().float()) and bool((s > 0).all())
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2**bits - 1
    q = quant.quantize(w, s, z, bits)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    err = (quant.dequantize(q, s, z) - w).abs()
    if method == "minmax":  # half a step, plus up to half a step lost to the rounded zero point
        assert bool((err <= s[:, None] + 1e-6).all())


def test_mse_search_never_worse_than_minmax():
    w = torch.randn(256, 16)
    w[:, 0] *= 8  # outliers make clipping pay
    errs = {}
    for m in ("minmax", "mse"):
        s, z = quant.init_params(w, 3, m)
        errs[m] = (quant.dequantize(quant.quantize(w, s, z, 3), s, z) - w).square().sum(-1)
    assert bool((errs["mse"] <= errs["minmax"] + 1e-6).all())
    assert errs["mse"].sum() < 0.97 * errs["minmax"].sum()


def test_padding_does_not_widen_the_range():
    w = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    valid = torch.tensor([True, True, True, False])
    s, z = quant.minmax_params(w, 4, valid=valid)
    assert s.item() == pytest.approx(2 / 15, rel=1e-3)


def test_fake_quant_forward_and_straight_through_gradients():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    s, z = quant.init_params(w.detach(), 4, "minmax")
    s.requires_grad_(True)
    out = quant.fake_quant(w, s, z, 4)
    assert torch.equal(out, quant.dequantize(quant.quantize(w.detach(), s.detach(), z, 4), s.detach(), z))
    out.sum().backward()
    # straight through the rounding, zero where the clamp bites: with the min-max range only a group's extreme can
    # round one step outside [0, 15] (its scale and zero point are rounded), so almost every gradient is 1
    code = torch.round(w.detach() / s.detach()[..., None] + z[..., None])
    inside = (code >= 0) & (code <= 15)
    assert torch.equal(w.grad, inside.float()) and int(inside.sum()) >= w.numel() - w.shape[0]
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="bits"):
        quant.check_bits(5)
    with pytest.raises(ValueError, match="group size"):
        quant.check_group_size(24)
    with pytest.raises(ValueError, match="init"):
        quant.init_params(torch.randn(2, 16), 4, "percentile")


@pytest.mark.parametrize("bits,new_bits,g", [(3, 4, 16), (3, 4, 128), (2, 4, 32), (3, 8, 64), (4, 4, 16)])
def test_repack_codes_keeps_the_integers(bits, new_bits, g):
    q = torch.randint(0, 1 << bits, (37, g), generator=torch.Generator().manual_seed(bits * g))
    out = quant.repack_codes(quant.pack_codes(q, bits), bits, new_bits, g, chunk=8)  # several chunks
    assert out.shape == (37, g * new_bits // 8) and out.dtype == torch.uint8
    assert torch.equal(quant.unpack_codes(out, new_bits, g).long(), q)
    if new_bits > bits:
        with pytest.raises(ValueError, match="cannot repack"):
            quant.repack_codes(out, new_bits, bits, g)
