import math

import pytest
import torch

from gqsa.eval.ppl import model_context, perplexity
from gqsa.models import load_model


class CharTokenizer:
    """Bytes as tokens, with BOS = 1 first (the shape of a real tokenizer's output)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [1] + [b % 96 for b in text.encode()]

        class Out:
            input_ids = torch.tensor([ids])

        return Out


def test_gptq_protocol_windows_and_mean_nll(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 12)  # 541 tokens with BOS
    r = perplexity(tiny_llama, CharTokenizer(), str(text), context=64, batch_size=3, progress=False)
    ids = CharTokenizer()(text.read_text()).input_ids[0]
    assert r["tokens"] == ids.numel() and r["windows"] == ids.numel() // 64  # the tail is dropped
    nlls = []
    with torch.no_grad():
        for w in ids[: r["windows"] * 64].reshape(-1, 64):  # non-overlapping, one at a time
            logits = tiny_llama(w[None]).logits[0]
            nlls.append(torch.nn.functional.cross_entropy(logits[:-1], w[1:]).item())
    assert r["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    r2 = perplexity(tiny_llama, CharTokenizer(), str(text), context=64, max_windows=2, progress=False)
    assert r2["windows"] == 2 and r2["ppl"] == pytest.approx(math.exp(sum(nlls[:2]) / 2), rel=1e-5)
    assert r2["evaluated_tokens"] == 2 * 64 and r2["tokens"] == ids.numel()


def test_context_is_capped_by_the_model(tiny_llama):
    assert model_context(tiny_llama) == 128
    tiny_llama.config.max_position_embeddings = 4096
    assert model_context(tiny_llama) == 2048


def test_a_context_beyond_the_models_is_refused(tiny_llama, tmp_path):
    """--context longer than max_position_embeddings (128 here) is one clear error, not an hour of quadratic
    attention over positions the model was not made for; the maximum itself is fine."""
    from gqsa.eval.fidelity import evaluate_fidelity

    (tmp_path / "t.txt").write_text("abcdefgh " * 200)
    for bad in (129, 100000, 0):
        with pytest.raises(ValueError, match=f"--context {bad}: use 1 to 128, the model's maximum context"):
            perplexity(tiny_llama, CharTokenizer(), str(tmp_path / "t.txt"), context=bad, progress=False)
        with pytest.raises(ValueError, match="use 1 to 128"):
            evaluate_fidelity(tiny_llama, tiny_llama, CharTokenizer(), str(tmp_path / "t.txt"), context=bad,
                              progress=False)
    r = perplexity(tiny_llama, CharTokenizer(), str(tmp_path / "t.txt"), context=128, max_windows=1, progress=False)
    assert r["context"] == 128 and r["windows"] == 1


def test_too_short_text_is_refused(tiny_llama, tmp_path):
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama, CharTokenizer(), str(tmp_path / "short.txt"), progress=False)


@pytest.mark.slow
def test_gutenberg_reference_perplexity(asset):
    """The assets README's protocol on gutenberg-llama-22m (fp32): heldout.txt is 280,276 tokens, 547 windows of 512
    (its whole-file figure, 48.01, took ~4 min on 2 CPU cores); the first 16 windows give 54.3474, as transformers'
    own per-window loss computes it independently (``model(w, labels=w).loss`` averaged over the 16 windows: 54.347403)."""
    from gqsa.eval.ppl import text_windows

    model, tok = load_model(asset("models/gutenberg-llama-22m"))
    text = str(asset("data/gutenberg/heldout.txt"))
    ids, windows = text_windows(text, tok, 512)
    assert (ids.numel(), windows.shape[0], int(ids[0])) == (280276, 547, tok.bos_token_id)
    r = perplexity(model, tok, text, batch_size=8, progress=False, max_windows=16)
    assert (r["tokens"], r["windows"], r["evaluated_tokens"], r["context"]) == (280276, 16, 16 * 512, 512)
    assert r["ppl"] == pytest.approx(54.3474, abs=0.01)
