"""Shared fixtures: paths of the local assets (``../shared/assets`` from the project root)."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = (Path(__file__).parents[1] / ".." / "shared" / "assets").resolve()


@pytest.fixture(scope="session")
def assets() -> Path:
    """The assets folder; skips the test when it is missing."""
    if not ASSETS.is_dir():
        pytest.skip(f"local assets not found at {ASSETS}")
    return ASSETS


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def asset(assets: Path):
    """``asset("models/stories260K/tok512.bin")`` -> its path; skips the test when it is missing."""

    def get(relative: str) -> Path:
        path = assets / relative
        if not path.exists():
            pytest.skip(f"local asset not found: {path}")
        return path

    return get


@pytest.fixture
def tiny_llama():
    """A random 2-block LLaMA with grouped-query attention and K not divisible by 16 in the MLP."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def stories260k(asset):
    """(model path, tokenizer path) of the llama2.c stories260K checkpoint."""
    return asset("models/stories260K/stories260K.bin"), asset("models/stories260K/tok512.bin")


# Compressed real models shared by tests/engine, tests/integrations and the serving CLI tests
# (one-shot GQSA W4 S50 G16, 16×128 calibration tokens), made once per session.
def compressed_folder(base, name, model_path, tokenizer, calib_text):
    """Compress ``model_path`` once per session into ``base/name`` (shared by the test folders)."""
    import torch

    import gqsa
    from gqsa import GQSAConfig, calib
    from gqsa.models import load_model

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
