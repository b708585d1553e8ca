import pytest
import torch

from gqsa import FormatError, GQSALinear
from gqsa.kernels import reference

from test_format import make_layer


def test_forward_equals_x_times_dequantized_weight_plus_bias():
    p, dense = make_layer(n=12, k=40, g=16)
    bias = torch.randn(12)
    m = GQSALinear.from_packed(p, bias)
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(m(x), x @ dense.T + bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.dequantize(), reference.dequantize(p))


def test_dtype_casts_keep_the_packed_format_and_device_moves_apply():
    p, _ = make_layer()
    m = GQSALinear.from_packed(p, torch.zeros(12))
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16 and m.row_ptr.dtype == torch.int32
    assert m.bias.dtype == torch.bfloat16
    m.half().float()
    assert torch.equal(m.scales, p.scales)


def test_state_dict_round_trip_with_any_number_of_groups():
    p, _ = make_layer()
    src = GQSALinear.from_packed(p)
    dst = GQSALinear(40, 12, 4, 16)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.dequantize(), src.dequantize())


def test_loading_a_malformed_state_is_refused():
    p, _ = make_layer()
    sd = GQSALinear.from_packed(p).state_dict()
    sd["col_idx"] = sd["col_idx"] + 100
    with pytest.raises(FormatError, match="col_idx out of range"):
        GQSALinear(40, 12, 4, 16).load_state_dict(sd)


def test_cpu_weight_cache_is_bitwise_the_reference_and_follows_the_buffers():
    p, _ = make_layer(n=12, k=40, g=16)
    m = GQSALinear.from_packed(p, torch.randn(12))
    x = torch.randn(3, 5, 40)
    want = reference.linear(x, m.packed, m.bias)
    assert torch.equal(m(x), want) and m._dense is not None
    w = m._dense[1]
    assert torch.equal(m(x), want) and m._dense[1] is w  # reused, not rebuilt
    assert torch.equal(m(x.double()), reference.linear(x.double(), m.packed, m.bias.double()))  # per dtype

    m.scales.mul_(2)  # in place: the version counter moves
    assert torch.equal(m(x), reference.linear(x, m.packed, m.bias)) and not torch.equal(m(x), want)
    m.scales = m.scales / 2  # reassigned buffer
    assert torch.equal(m(x), want)
    m.qweight.data = m.qweight.data.flip(0).contiguous()  # storage swapped under the same tensor object
    assert torch.equal(m(x), reference.linear(x, m.packed, m.bias))

    src = GQSALinear.from_packed(p, torch.zeros(12))
    m.load_state_dict(src.state_dict())
    assert m._dense is None and torch.equal(m(x), src(x))
    m.to("cpu")
    m.float()
    assert m._dense is None

    m.cpu_weight_cache = False
    m.drop_weight_cache()
    assert torch.equal(m(x), reference.linear(x, m.packed, m.bias)) and m._dense is None
    m.cpu_weight_cache, m.backend = True, "reference"  # the forced reference never caches
    assert torch.equal(m(x), reference.linear(x, m.packed, m.bias)) and m._dense is None
