"""Compressed real models for the engine tests (one-shot GQSA W4 S50 G16, 16×128 calibration tokens)."""
from __future__ import annotations

import pytest
import torch

import gqsa
from gqsa import GQSAConfig, calib
from gqsa.models import load_model


def compressed_folder(base, name, model_path, tokenizer, calib_text):
    """Compress ``model_path`` once per session into ``base/name`` (shared by the test folders)."""
    out = base / "gqsa-serving" / name
    if not (out / "config.json").is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small models: one thread is fastest on a busy machine
        try:
            model, tok = load_model(model_path, tokenizer)
            tokens = calib.calibration_tokens(str(calib_text), tok, 16, 128, 0)
            gqsa.compress(model, GQSAConfig(bits=4, group_size=16, sparsity=0.5, stages="oneshot"), tokens,
                          device="cpu", progress=False)
            gqsa.save(model, out, tok, overwrite=True)
        finally:
            torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def s260k_folder(tmp_path_factory, stories260k, asset):
    model, tok = stories260k
    return compressed_folder(tmp_path_factory.getbasetemp(), "stories260K-w4s50g16", model, tok,
                             asset("data/wikitext2/wiki.valid.tokens"))


@pytest.fixture(scope="session")
def g22m_folder(tmp_path_factory, asset):
    return compressed_folder(tmp_path_factory.getbasetemp(), "gutenberg-22m-w4s50g16",
                             asset("models/gutenberg-llama-22m"), None, asset("data/gutenberg/calib.txt"))
