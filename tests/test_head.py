"""gqsa.head: the output layer quantized (``--quantize-lm-head``)."""
import pytest
import torch

import gqsa
from gqsa import GQSAConfig, GQSALinear
from gqsa.head import HEAD_GROUP, head_hessian, quantize_head
from gqsa.pipeline import compress_model
from gqsa.kernels.reference import dequantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tokens(n=8, t=32):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(3))


def test_the_head_hessian_is_that_of_the_final_hidden_states(tiny_llama):
    x = tokens()
    with torch.no_grad():
        h = tiny_llama(x, output_hidden_states=True).hidden_states[-1].reshape(-1, 64).double()
    want = h.T @ h / h.shape[0]
    got = head_hessian(tiny_llama, x, "cpu", batch_size=3)  # batches of 3, 3 and 2 windows
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits, tol", [(8, 0.01), (4, 0.15)])
def test_quantize_head_unties_and_keeps_the_weight_within_its_bits(tiny_llama, bits, tol):
    emb = tiny_llama.get_input_embeddings().weight
    before = emb.detach().clone()
    assert tiny_llama.lm_head.weight is emb  # the fixture is tied
    name, p = quantize_head(tiny_llama, tokens(), bits, "cpu")
    assert name == "lm_head" and (p.bits, p.group_size, p.shape) == (bits, HEAD_GROUP, (96, 64))
    assert p.sparsity == 0.0
    w = dequantize(p, torch.float32)
    assert ((w - before).norm() / before.norm()).item() < tol
    assert tiny_llama.lm_head.weight is not tiny_llama.get_input_embeddings().weight
    assert torch.equal(tiny_llama.get_input_embeddings().weight, before)  # the embedding is not touched
    assert tiny_llama.config.tie_word_embeddings is False


def test_head_bits_are_checked():
    for bad, match in ((dict(lm_head_bits=3), "lm_head_bits must be 4 or 8"),
                       (dict(lm_head_bits=8, e2e_train_zero=True), "e2e_train_zero")):
        with pytest.raises(ValueError, match=match):
            GQSAConfig(**bad)


@pytest.mark.parametrize("stages", ["oneshot", "bqpo+e2e"])
def test_a_compression_quantizes_the_head_and_saves_it(tiny_llama, tmp_path, stages):
    stats = {}
    config = GQSAConfig(stages=stages, lm_head_bits=8, bqpo_epochs=1, e2e_epochs=1, bqpo_patience=1)
    packed = compress_model(tiny_llama, config, tokens(10), "cpu", 4, False, stats=stats)
    assert isinstance(tiny_llama.lm_head, GQSALinear) and packed["lm_head"].bits == 8
    assert len(packed) == 2 * 7 + 1
    if stages != "oneshot":  # E2E-OQP trained the head's scales with the others
        assert stats["e2e"]["train_windows"] == 9
    x = tokens(2)
    with torch.no_grad():
        want = tiny_llama(x).logits
    gqsa.save(tiny_llama, tmp_path / "out")
    loaded, _ = gqsa.load(tmp_path / "out")
    assert isinstance(loaded.lm_head, GQSALinear) and loaded.config.tie_word_embeddings is False
    assert loaded.lm_head is not loaded.get_input_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want)
