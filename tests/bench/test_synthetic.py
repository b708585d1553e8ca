import pytest
import torch

from gqsa.engine import Engine
from gqsa.bench.synthetic import arch_config, build_synthetic, parse_setting, random_packed, weight_bytes
from gqsa.format import design_bits_per_weight
from gqsa.kernels import block_layout
from gqsa.nn import GQSALinear


@pytest.mark.parametrize("s", [0.5, 0.3])
def test_random_packed_is_valid_and_row_balanced(s):
    g = torch.Generator().manual_seed(0)
    p = random_packed(48, 256, s, 4, 16, "cpu", g)
    p.validate("synthetic")
    counts = (p.row_ptr[1:] - p.row_ptr[:-1]).unique().tolist()
    assert counts == [round((1 - s) * 16)]
    assert abs(p.sparsity - (1 - round((1 - s) * 16) / 16)) < 1e-9
    real_s = 1 - round((1 - s) * 16) / 16
    assert p.bits_per_weight() == pytest.approx(design_bits_per_weight(real_s, 4, 16, 256), abs=0.01)  # + row_ptr[N]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_random_packed_weights_have_zero_mean(bits):
    """Random codes around their zero points: no bias that would grow through the layers of a deep model."""
    from gqsa.kernels import reference

    p = random_packed(64, 1024, 0.0, bits, 128, "cpu", torch.Generator().manual_seed(bits))
    w = reference.dequantize(p, torch.float32)
    assert abs(float(w.mean())) < 0.02 * float(w.std()), (float(w.mean()), float(w.std()))


def test_settings_and_architectures():
    assert parse_setting("W4S50G16").sparsity == 0.5 and parse_setting("w4s30g16").group_size == 16
    assert parse_setting("fp16").kind == "dense" and parse_setting("tinygemm").kind == "tinygemm"
    assert parse_setting("w3s0g128").bits == 3  # served by the 4-bit kernels (gemv.kernel_packed)
    random_packed(32, 256, 0.0, 3, 128, "cpu", torch.Generator().manual_seed(0)).validate()
    for bad in ("w4s50", "w5s50g16", "w4s50g24", "int3"):
        with pytest.raises(ValueError, match="setting"):
            parse_setting(bad)
    assert arch_config("llama-2-70b-layers=3").num_hidden_layers == 3
    assert arch_config("llama-3-8b").num_key_value_heads == 8
    for bad in ("llama-9b", "llama-2-7b-layers=0"):
        with pytest.raises(ValueError):
            arch_config(bad)
    with pytest.raises(ValueError, match="CUDA"):
        build_synthetic("tiny", "tinygemm", "cpu")


def test_synthetic_gqsa_model_runs_in_the_engine_and_in_transformers():
    dense = build_synthetic("tiny", "fp16", "cpu").float()
    model = build_synthetic("tiny", "w4s50g16", "cpu").float()
    lin = [m for m in model.modules() if isinstance(m, GQSALinear)]
    assert len(lin) == 7 * 2
    for m in lin:
        c = m.in_features // 16
        assert abs(m.packed.sparsity - (1 - round(0.5 * c) / c)) < 1e-9
    assert weight_bytes(model) < 0.5 * weight_bytes(dense)
    ids = [[3, 4, 5], [9]]
    out = Engine(model).generate(ids, 6).tokens
    hf = [model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(p):].tolist() for p in ids]
    assert out == hf


def test_synthetic_block_setting():
    """``gqsa bench --synthetic`` settings ``w{b}s{S}g{G}b{R}``: block-uniform random layers."""
    st = parse_setting("w4s50g16b64")
    assert st.kind == "gqsa" and st.block_rows == 64 and parse_setting("w4s50g16").block_rows == 0
    with pytest.raises(ValueError, match="power of two"):
        parse_setting("w4s50g16b24")
    p = random_packed(200, 256, 0.5, 4, 16, "cpu", torch.Generator().manual_seed(0), block_rows=64)
    p.validate()
    assert block_layout.detect_block_rows(p) == 64


def test_synthetic_cluster_setting():
    """``w{b}s{S}g{G}c{R}``: clusters of R non-consecutive rows share their columns (``--allocation clusterR``)."""
    st = parse_setting("w4s50g16c64")
    assert st.block_rows == 64 and st.clustered and not parse_setting("w4s50g16b64").clustered
    p = random_packed(256, 256, 0.5, 4, 16, "cpu", torch.Generator().manual_seed(0), block_rows=64, clustered=True)
    p.validate()
    assert block_layout.detect_block_rows(p) is None
    r, row_map = block_layout.detect_row_clusters(p)
    assert r == 64 and sorted(row_map[row_map >= 0].tolist()) == list(range(256))


def test_synthetic_quantized_head_setting():
    """``…h<bits>``: the output layer quantized too (``--quantize-lm-head``), and the engine runs it."""
    st = parse_setting("w4s50g16h8")
    assert st.head_bits == 8 and parse_setting("w4s50g16c64h4").head_bits == 4 and parse_setting("w4s50g16").head_bits == 0
    with pytest.raises(ValueError, match="4 or 8 bits"):
        parse_setting("w4s50g16h3")
    plain = build_synthetic("tiny", "w4s50g16", "cpu").float()
    model = build_synthetic("tiny", "w4s50g16h8", "cpu").float()
    head = model.lm_head
    assert isinstance(head, GQSALinear) and head.bits == 8 and head.packed.shape == (256, 64)
    assert weight_bytes(model) < weight_bytes(plain)
    out = Engine(model).generate([[3, 4, 5]], 4).tokens
    hf = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, 3:].tolist()
    assert out == [hf]


def test_memory_needed_counts_what_the_build_allocates(monkeypatch):
    """The estimate ``gqsa bench`` checks: on a GPU the dense weights as built and the packed bytes with their
    kernels' layouts (``block_layout.resident_bytes``: the measured factors); on a CPU float32 (twice the fp16
    build) and the float32 weight cache of every GQSA layer, unless it is switched off."""
    from gqsa.bench.synthetic import MEMORY_OVERHEAD, memory_needed
    from gqsa.kernels.block_layout import resident_bytes

    fp16 = weight_bytes(build_synthetic("tiny", "fp16", "cpu"))
    assert memory_needed("tiny", "fp16", "cuda") == fp16 + MEMORY_OVERHEAD
    assert memory_needed("tiny", "fp16", "cpu") == 2 * fp16 + MEMORY_OVERHEAD
    for name, kind in (("w4s50g16", "irregular"), ("w4s30g16c64", "block")):
        model = build_synthetic("tiny", name, "cpu")
        layers = [m for m in model.modules() if isinstance(m, GQSALinear)]
        packed = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
        dense = sum(m.in_features * m.out_features for m in layers)
        assert memory_needed("tiny", name, "cuda") == (weight_bytes(model) - packed + resident_bytes(packed, kind)
                                                       + MEMORY_OVERHEAD)
        cached = memory_needed("tiny", name, "cpu")
        monkeypatch.setenv("GQSA_CPU_WEIGHT_CACHE", "0")
        assert cached - memory_needed("tiny", name, "cpu") == 4 * dense
        monkeypatch.delenv("GQSA_CPU_WEIGHT_CACHE")
    assert memory_needed("llama-2-7b", "fp16", "cpu") > 26e9  # float32 on a CPU: more than a 24 GB machine holds
