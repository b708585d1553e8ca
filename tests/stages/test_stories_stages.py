"""The trained stages on the real stories260K: each stage lowers the perplexity of the one before.

(Calibrated on WikiText-2 valid, evaluated on WikiText-2 test: E2E-OQP can take the perplexity below
the uncompressed model's, which never saw WikiText; so only the order and the recovered fraction are
asserted.)"""
import pytest

from gqsa import GQSAConfig, calib
from gqsa.pipeline import compress_model, split_calibration
from gqsa.eval.ppl import perplexity
from gqsa.models import load_model
from gqsa.stages.e2e import run_e2e

WINDOWS = 100


@pytest.mark.slow
def test_oneshot_then_bqpo_then_e2e_each_lower_the_perplexity(stories260k, asset):
    model, tok = load_model(*map(str, stories260k))
    tokens = calib.calibration_tokens(str(asset("data/wikitext2/wiki.valid.tokens")), tok, 40, 256, seed=0)
    text = str(asset("data/wikitext2/wiki.test.raw"))

    def ppl(m):
        return perplexity(m, tok, text, context=256, max_windows=WINDOWS, progress=False)["ppl"]

    fp = ppl(model)
    config = GQSAConfig.preset("fast", sparsity=0.5)
    one = load_model(*map(str, stories260k))[0]
    compress_model(one, GQSAConfig(**{**config.to_dict(), "stages": "oneshot"}), tokens, "cpu", 8, False)
    p_one = ppl(one)
    packed = compress_model(model, GQSAConfig(**{**config.to_dict(), "stages": "bqpo"}), tokens, "cpu", 8, False)
    p_bqpo = ppl(model)
    run_e2e(model, packed, config, *split_calibration(tokens, config.val_fraction), "cpu", False,
            teacher=load_model(*map(str, stories260k))[0])  # the default objective distils from the original
    p_e2e = ppl(model)
    assert p_e2e < p_bqpo < p_one, (fp, p_one, p_bqpo, p_e2e)
    assert (p_one - p_e2e) / (p_one - fp) > 0.6, (fp, p_one, p_bqpo, p_e2e)
