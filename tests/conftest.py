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
