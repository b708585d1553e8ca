import math

import pytest
import torch

from gqsa import format as F
from gqsa import quant
from gqsa.kernels import reference


def make_layer(n=12, k=40, g=16, bits=4, density=0.5, float_zeros=False, seed=0):
    """A random packed layer and its float32 fake-quantized, masked dense weight."""
    torch.manual_seed(seed)
    c = math.ceil(k / g)
    w = torch.nn.functional.pad(torch.randn(n, k), (0, c * g - k)).reshape(n, c, g)
    valid = (torch.arange(c * g) < k).reshape(c, g)
    s, z = quant.init_params(w, bits, "mse", valid=valid)
    if float_zeros:
        z = (z + torch.rand_like(z) - 0.5).half().float()
    q = quant.quantize(w, s, z, bits)
    mask = torch.rand(n, c) < density
    mask[0] = False  # an empty row
    mask[1] = True  # a full row
    p = F.pack(q, s, z, mask, (n, k), bits, g, float_zeros=float_zeros)
    dense = (quant.fake_quant(w, s, z, bits) * mask[..., None]).reshape(n, -1)[:, :k]
    return p, dense


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("g,k", [(16, 40), (32, 64), (64, 172), (128, 300)])
@pytest.mark.parametrize("float_zeros", [False, True])
def test_unpack_of_pack_equals_fake_quant_exactly(bits, g, k, float_zeros):
    p, dense = make_layer(k=k, g=g, bits=bits, float_zeros=float_zeros)
    p.validate()
    assert torch.equal(reference.dequantize(p), dense)


def test_layout_dtypes_and_shapes():
    p, _ = make_layer(n=12, k=40, g=16, bits=4)
    assert p.row_ptr.dtype == torch.int32 and p.row_ptr.shape == (13,)
    assert p.col_idx.dtype == torch.int16 and p.qweight.shape == (p.nnz, 8)
    assert p.scales.dtype == torch.float16 and p.zeros.dtype == torch.uint8
    assert p.row_ptr[1] == 0 and p.row_ptr[2] == 3  # empty first row, full second row (C = 3)


def test_padding_codes_dequantize_to_zero():
    p, _ = make_layer(n=4, k=40, g=16, bits=4, density=1.0)
    codes = quant.unpack_codes(p.qweight, 4, 16)
    last = p.col_idx == 2
    assert torch.equal(codes[last][:, 8:], p.zeros[last][:, None].expand(-1, 8))


def test_bits_per_weight_matches_design_formula():
    # N=4096, K=4096, S=50% row-balanced, G=16, int zeros: (1-S)(b + 40/G) + 32/K (+ one row_ptr entry)
    n = k = 4096
    c = k // 16
    p = F.PackedLinear(row_ptr=torch.arange(0, n * c // 2 + 1, c // 2, dtype=torch.int32),
                       col_idx=torch.zeros(n * c // 2, dtype=torch.int16),
                       qweight=torch.zeros(n * c // 2, 8, dtype=torch.uint8),
                       scales=torch.ones(n * c // 2, dtype=torch.float16),
                       zeros=torch.zeros(n * c // 2, dtype=torch.uint8), shape=(n, k), bits=4, group_size=16)
    design = F.design_bits_per_weight(0.5, 4, 16, k)
    assert design == pytest.approx(3.25 + 32 / 4096)
    assert p.bits_per_weight() == pytest.approx(design + 32 / (n * k))


def _tensors(p):
    return {k: v.clone() for k, v in p.tensors().items()}


BAD = {
    "row_ptr out of range": (lambda t: t["row_ptr"].__setitem__(-1, 10**6), "row_ptr must start at 0 and end"),
    "row_ptr decreasing": (lambda t: t["row_ptr"].__setitem__(5, 0), "row_ptr decreases"),
    "col_idx out of range": (lambda t: t["col_idx"].__setitem__(0, 99), "col_idx out of range"),
    "col_idx descending": (lambda t: t["col_idx"].__setitem__(slice(3, 5), torch.tensor([2, 1], dtype=torch.int16)),
                           "ascending"),
    "scales dtype": (lambda t: t.__setitem__("scales", t["scales"].float()), "scales has dtype"),
    "scales nan": (lambda t: t["scales"].__setitem__(0, float("nan")), "finite"),
    "zero too big": (lambda t: t["zeros"].__setitem__(0, 200), "does not fit"),
    "qweight shape": (lambda t: t.__setitem__("qweight", t["qweight"][:, :4]), "qweight has shape"),
    "missing": (lambda t: t.pop("zeros"), "missing tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validation_names_the_problem(case):
    p, _ = make_layer(n=12, k=40, g=16)
    t = _tensors(p)
    edit, message = BAD[case]
    edit(t)
    with pytest.raises(F.FormatError, match=message):
        F.validate(t, p.shape, p.bits, p.group_size, "layer0")


@pytest.mark.parametrize("shape", [(0, 16), (16, 0)])
def test_empty_dimensions_are_refused(shape):
    n, k = shape
    with pytest.raises(F.FormatError, match="positive"):
        F.pack(torch.zeros(n, 1, 16), torch.ones(n, 1), torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool),
               shape, 4, 16)
    with pytest.raises(F.FormatError, match="empty dimension"):
        F.validate({}, shape, 4, 16)
