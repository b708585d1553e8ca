"""Fixtures shared by the engine tests."""
import pytest
import torch

import gqsa
from gqsa import GQSAConfig


@pytest.fixture
def tiny_gqsa(tiny_llama):
    """``tiny_llama`` compressed one-shot (GQSA defaults) on the CPU, seeded."""
    torch.manual_seed(0)
    gqsa.compress(tiny_llama, GQSAConfig(stages="oneshot"), torch.randint(0, 96, (4, 32)), device="cpu",
                  progress=False)
    return tiny_llama
