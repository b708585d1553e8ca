"""tests/stages: one torch thread (the CI machine's few cores are shared), and a tiny LLaMA whose
compression error is large enough for training to matter."""
from __future__ import annotations

import pytest
import torch

from stages_helpers import make_llama


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llama_factory():
    """``llama_factory()`` -> a fresh copy of the same random 2-block LLaMA (GQA, K=88 not a multiple of 16)."""
    state = make_llama().state_dict()

    def make():
        m = make_llama()
        m.load_state_dict(state)
        return m

    return make


@pytest.fixture
def calib_tokens():
    g = torch.Generator().manual_seed(1)
    # a repetitive "language" so that a random model's activations carry structure
    base = torch.randint(0, 96, (24,), generator=g)
    rows = [torch.roll(base, int(s)) for s in torch.randint(0, 24, (20,), generator=g)]
    noise = torch.randint(0, 96, (20, 48), generator=g)
    return torch.where(torch.rand(20, 48, generator=g) < 0.7, torch.cat([torch.stack(rows)] * 2, 1), noise)
