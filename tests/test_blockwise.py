"""gqsa.blockwise: the statistics of a group of linears, taken with each forward pass stopped early."""
import functools

import pytest
import torch

from gqsa import GQSAConfig, oneshot
from gqsa.blockwise import capture_inputs, group_statistics
from gqsa.models.adapters import get_adapter
from gqsa.pipeline import compress_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tokens(n=6, t=24):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(5))


def test_stopping_early_gives_the_same_statistics_and_skips_the_rest_of_the_block(tiny_llama):
    adapter = get_adapter(tiny_llama)
    block = adapter.blocks(tiny_llama)[0]
    batches = capture_inputs(tiny_llama, adapter.blocks(tiny_llama), tokens(), 4, "cpu")
    linears = adapter.linears(block)
    mlp_calls = []
    block.mlp.register_forward_pre_hook(lambda module, args: mlp_calls.append(1))
    for group in adapter.linear_groups:
        mlp_calls.clear()
        full = group_statistics(block, linears, group, batches, stop_early=False)
        assert len(mlp_calls) == len(batches)
        mlp_calls.clear()
        early = group_statistics(block, linears, group, batches)
        assert full.keys() == early.keys() and all(torch.equal(full[n], early[n]) for n in group)
        # the attention's groups stop before the MLP; the MLP's own groups need it
        assert len(mlp_calls) == (len(batches) if group[0].startswith("mlp.") else 0)
    assert all(not m._forward_hooks for m in linears.values())  # every hook removed


def test_a_oneshot_compression_is_bitwise_the_same_with_and_without_the_early_stop(tiny_llama, monkeypatch):
    import copy

    other = copy.deepcopy(tiny_llama)
    config = GQSAConfig(stages="oneshot")
    fast = compress_model(tiny_llama, config, tokens(), "cpu", 4, False)
    monkeypatch.setattr(oneshot, "group_statistics", functools.partial(group_statistics, stop_early=False))
    slow = compress_model(other, config, tokens(), "cpu", 4, False)
    assert fast.keys() == slow.keys()
    for name in fast:
        for field in ("row_ptr", "col_idx", "qweight", "scales", "zeros"):
            assert torch.equal(getattr(fast[name], field), getattr(slow[name], field)), (name, field)
