"""tests/models: run torch on one thread (the test machine's few cores are shared; oversubscribed
intra-op threads made a 40-token generate ~70x slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
