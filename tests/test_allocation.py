"""--target-bits: the per-layer sparsity budget solver and its use in compression."""
from __future__ import annotations

import math

import pytest
import torch

from gqsa import allocation, prune
from gqsa.config import GQSAConfig
from gqsa.format import pack
from gqsa.pipeline import compress_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is fastest on a busy machine


def test_packed_bits_is_what_pack_stores():
    n, k, g, bits = 24, 100, 16, 3
    c = math.ceil(k / g)
    mask = prune.select_mask(torch.rand(n, c), 0.4, "row")
    p = pack(torch.zeros(n, c, g), torch.ones(n, c), torch.zeros(n, c), mask, (n, k), bits, g)
    assert 8 * p.nbytes() == allocation.packed_bits(n, k, int(mask[0].sum()), bits, g)


def _convex_costs(c, gen):
    steps = torch.rand(c, generator=gen).sort().values * torch.rand(1, generator=gen) * 10  # increasing removals
    return torch.cat([torch.zeros(1), steps.cumsum(0)]).flip(0)  # cost[m], m kept


@pytest.mark.parametrize("shapes", [  # gutenberg-llama-22m and SmolLM2-135M blocks (q, k, v, o, gate, up, down)
    [(384, 384), (128, 384), (128, 384), (384, 384), (1024, 384), (1024, 384), (384, 1024)] * 6,
    [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30])
@pytest.mark.parametrize("target", [2.5, 3.3, 4.0])
def test_budget_solver_meets_the_target_within_002(shapes, target):
    gen = torch.Generator().manual_seed(0)
    g, bits = 16, 4
    layers = {f"l{i}": (r, k, _convex_costs(math.ceil(k / g), gen)) for i, (r, k) in enumerate(shapes)}
    keep = allocation.allocate(layers, bits, g, target)
    total = sum(allocation.packed_bits(r, k, keep[n], bits, g) for n, (r, k, _) in layers.items())
    got = total / sum(r * k for r, k, _ in layers.values())
    assert target - 0.02 <= got <= target
    assert len(set(keep.values())) > 1  # really per layer
    uniform = 1 - target / (bits + 40 / g)
    for n, (r, k, _) in layers.items():  # within the deviation bound (one group of rounding)
        c = math.ceil(k / g)
        assert abs((c - keep[n]) / c - uniform) <= 0.2 + 1 / c


def test_budget_solver_meets_the_target_where_the_deviation_bound_cannot():
    """Narrow layers (K = 64, G16: 4 groups a row, the row pointers half a bit per weight): within ±0.2 of the
    uniform sparsity every layer keeps 2 groups (3.76 bits/weight), above a 3.3 target; the solver then goes on
    without the bound and meets the budget (before: 3.76 returned without a word)."""
    gen = torch.Generator().manual_seed(0)
    layers = {f"l{i}": (64, 64, _convex_costs(4, gen)) for i in range(6)}
    bounded_only = {n: 2 for n in layers}
    weights = 6 * 64 * 64
    assert sum(allocation.packed_bits(64, 64, 2, 4, 16) for _ in layers) / weights > 3.3
    keep = allocation.allocate(layers, 4, 16, 3.3)
    got = sum(allocation.packed_bits(r, k, keep[n], 4, 16) for n, (r, k, _) in layers.items()) / weights
    assert got <= 3.3 and keep != bounded_only and min(keep.values()) == 1


def test_budget_solver_prefers_the_cheap_layer():
    cheap = torch.linspace(1.0, 0.0, 9) * 0.01
    dear = torch.linspace(1.0, 0.0, 9)
    keep = allocation.allocate({"cheap": (64, 128, cheap), "dear": (64, 128, dear)}, 4, 16, 4.0, max_deviation=None)
    assert keep["cheap"] < keep["dear"]


def test_budget_solver_refuses_impossible_targets():
    layers = {"a": (64, 128, torch.linspace(1.0, 0.0, 9))}
    with pytest.raises(ValueError, match="below the smallest possible size"):
        allocation.allocate(layers, 4, 16, 0.3)
    with pytest.raises(ValueError, match="needs no pruning"):
        allocation.allocate(layers, 4, 16, 7.0)


def test_removal_costs_are_monotone_and_relative():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen)
    w = torch.randn(8, 64, generator=gen)
    cost = allocation.removal_costs(w, x.T @ x / 512, 16)
    assert cost.shape == (5,) and cost[-1] == 0 and bool((cost[:-1] >= cost[1:]).all())
    assert torch.allclose(allocation.removal_costs(3 * w, x.T @ x / 512, 16), cost, rtol=1e-4)


def test_target_bits_compression_is_row_balanced_and_meets_the_budget():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True)).eval()
    tokens = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    config = GQSAConfig(bits=4, group_size=16, stages="oneshot", target_bits=3.3)
    packed = compress_model(model, config, tokens, device="cpu", progress=False)
    bits = sum(8 * p.nbytes() for p in packed.values())
    weights = sum(p.shape[0] * p.shape[1] for p in packed.values())
    assert 3.3 - 0.02 <= bits / weights <= 3.3
    sparsities = set()
    for name, p in packed.items():
        counts = (p.row_ptr[1:] - p.row_ptr[:-1]).unique()
        assert counts.numel() == 1  # row-balanced
        c = math.ceil(p.shape[1] / 16)
        assert config.layer_sparsity[name] == pytest.approx((c - int(counts)) / c, abs=1e-6)
        sparsities.add(config.layer_sparsity[name])
    assert len(sparsities) > 1
    assert GQSAConfig.from_dict(config.to_dict()).layer_sparsity == config.layer_sparsity


def test_bad_mask_and_target_are_refused():
    for bad in ({"mask": "iter0"}, {"mask": "rerank0"}, {"mask": "sometimes"}, {"target_bits": 0.0}, {"target_bits": 16.0}):
        with pytest.raises(ValueError):
            GQSAConfig(**bad)
    GQSAConfig(mask="iter3")
    GQSAConfig(mask="adaptive16")
    GQSAConfig(mask="cg20", allocation="layer")
    GQSAConfig(mask="cg20", allocation="block64")
    GQSAConfig(mask="rerank4", allocation="cluster16")
    with pytest.raises(ValueError, match="allocation must be one of"):
        GQSAConfig(allocation="block12")
    for mask in ("iter2", "adaptive"):  # row-balanced by construction
        for alloc in ("layer", "block16"):
            with pytest.raises(ValueError, match="allocation 'row'"):
                GQSAConfig(mask=mask, allocation=alloc)
