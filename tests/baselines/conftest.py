"""tests/baselines: one torch thread (the CPU is shared) and a correlated-input layer problem."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def layer_problem():
    """``(W [32, 64], X [1024, 64], H = XᵀX/n)`` with strongly correlated, unevenly scaled inputs
    (as LLM activations are: a few outlier features, shared directions)."""
    g = torch.Generator().manual_seed(0)
    n, k, samples = 32, 64, 1024
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.ones(k)
    scales[torch.randperm(k, generator=g)[:4]] = 8.0  # outlier features
    x = (torch.randn(samples, k, generator=g) @ mix) * scales
    w = torch.randn(n, k, generator=g) * 0.1
    h = x.T @ x / samples
    return w, x, h


def _output_error(w, w_hat, x):
    return ((x @ (w - w_hat).T) ** 2).sum().item()


@pytest.fixture
def output_error():
    """``output_error(w, w_hat, x)``: the layer's squared output error ‖X(W − Ŵ)ᵀ‖²."""
    return _output_error
