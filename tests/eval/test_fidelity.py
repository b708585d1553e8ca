"""KL(reference ‖ compressed) and top-1 agreement against brute force."""
from __future__ import annotations

import copy

import pytest
import torch

from gqsa.eval import evaluate_fidelity as fidelity
from gqsa.eval import perplexity


class CharTokenizer:
    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [1] + [b % 96 for b in text.encode()]

        class Out:
            input_ids = torch.tensor([ids])

        return Out


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 8)  # 361 tokens with BOS
    return str(path)


def _perturbed(model, scale=0.05):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def test_identical_models_have_zero_kl(tiny_llama, text):
    grad = []  # the forward passes run without autograd (no graph kept of two models' logits)
    hook = tiny_llama.register_forward_hook(lambda *a: grad.append(torch.is_grad_enabled()))
    r = fidelity(tiny_llama, tiny_llama, CharTokenizer(), text, context=64, batch_size=2, progress=False)
    hook.remove()
    assert grad and not any(grad)
    assert r["kl"] == 0.0 and r["top1_agreement"] == 1.0 and r["ppl"] == r["ppl_reference"]
    assert r["windows"] == 361 // 64 and r["tokens"] == r["windows"] * 64


def test_kl_and_agreement_match_brute_force(tiny_llama, text):
    other = _perturbed(tiny_llama)
    tok = CharTokenizer()
    r = fidelity(other, tiny_llama, tok, text, context=64, batch_size=3, max_windows=4, progress=False)
    ids = tok(open(text).read()).input_ids[0][: 4 * 64].reshape(4, 64)
    kls, agree = [], []
    with torch.no_grad():
        for w in ids:  # one window, one position at a time
            p = torch.softmax(tiny_llama(w[None]).logits[0].double(), -1)
            q = torch.softmax(other(w[None]).logits[0].double(), -1)
            for t in range(64):
                kls.append(sum(p[t, v] * (p[t, v].log() - q[t, v].log()) for v in range(p.shape[1])).item())
                agree.append(int(p[t].argmax() == q[t].argmax()))
    assert r["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert r["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert 0 < r["kl"] and r["top1_agreement"] < 1
    # the perplexities are the GPTQ-protocol ones over the same windows
    assert r["ppl"] == pytest.approx(perplexity(other, tok, text, context=64, max_windows=4, progress=False)["ppl"],
                                     rel=1e-5)
    assert r["ppl_reference"] == pytest.approx(
        perplexity(tiny_llama, tok, text, context=64, max_windows=4, progress=False)["ppl"], rel=1e-5)


def test_vocabulary_mismatch_is_refused(tiny_llama, text):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    with pytest.raises(ValueError, match="vocabulary"):
        fidelity(LlamaForCausalLM(cfg), tiny_llama, CharTokenizer(), text, context=64, progress=False)
