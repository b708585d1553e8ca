"""One-shot GQSA on the real stories260K: the quality relations that must hold."""
import pytest

from gqsa import GQSAConfig, calib, compress
from gqsa.eval.ppl import perplexity
from gqsa.models import load_model

WINDOWS = 200


@pytest.fixture(scope="module")
def setup(stories260k, asset):
    model, tok = load_model(*map(str, stories260k))
    tokens = calib.calibration_tokens(str(asset("data/wikitext2/wiki.valid.tokens")), tok, 64, 256, seed=0)
    text = str(asset("data/wikitext2/wiki.test.raw"))
    fp = perplexity(model, tok, text, max_windows=WINDOWS, progress=False)["ppl"]
    return stories260k, tok, tokens, text, fp


def ppl_after(setup, **settings):
    (path, tok_path), tok, tokens, text, _ = setup
    model, _ = load_model(str(path), str(tok_path))
    compress(model, GQSAConfig(stages="oneshot", **settings), tokens, device="cpu", progress=False)
    return perplexity(model, tok, text, max_windows=WINDOWS, progress=False)["ppl"]


def test_hessian_saliency_beats_magnitude_at_half_sparsity(setup):
    mag = ppl_after(setup, sparsity=0.5, saliency="magnitude")
    hes = ppl_after(setup, sparsity=0.5, saliency="hessian")
    assert hes < mag


def test_dense_w4_g16_stays_close_to_fp32(setup):
    fp = setup[-1]
    assert ppl_after(setup, sparsity=0.0, saliency="hessian") < 1.1 * fp
