"""Data-parallel compression on torch.distributed (gloo, 2 CPU processes).

What is exact: the gradient of a global batch split across ranks equals the one-process gradient
(up to float summation order), for BQPO's block MSE and E2E-OQP's causal-LM loss, with uneven and
empty shares; a whole 2-rank ``torchrun gqsa compress`` is bit for bit the one-process run that
simulates two ranks (``GQSA_SIMULATE_RANKS=2``: same shares, same shapes, same order of sums), so the
comparison holds on every machine whatever its BLAS does with other batch shapes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gqsa import checkpoint, distributed
from gqsa.stages import bqpo, e2e


# torch threads per process of the compress runs (GQSA_TEST_THREADS=2 checks that the bitwise results do
# not hinge on one thread)
THREADS = os.environ.get("GQSA_TEST_THREADS", "1")


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, hidden, **kwargs):
        return (self.down(F.gelu(self.up(hidden))),)


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _null():
    import contextlib

    return contextlib.nullcontext()


def _grad_worker(rank, world, store, out):
    _init(rank, world, store)
    try:
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(7, 5, 8, generator=g), torch.randn(7, 5, 8, generator=g)
        ids = torch.randint(0, 32, (7, 12), generator=g)
        rows = []
        # shares: even, uneven, one rank empty
        for idx in (torch.tensor([0, 3, 5, 6]), torch.tensor([1, 2, 4]), torch.tensor([2])):
            ref = _Block()
            F.mse_loss(ref(x[idx])[0], y[idx]).backward()
            block = _Block()
            bqpo.distributed_step(distributed.wrap(block, torch.device("cpu")), x, y, idx, {}, "cpu", torch.float32,
                                   _null)
            rows.append(max((a.grad - b.grad).abs().max().item() / b.grad.abs().max().item()
                            for a, b in zip(block.parameters(), ref.parameters())))
            # E2E-OQP: a micro-batch idx of an optimizer step of 6 windows
            ref_lm, lm = _tiny_lm(), _tiny_lm()
            (e2e.causal_lm_loss(ref_lm, ids[idx]) * (len(idx) / 6)).backward()
            total = e2e.distributed_backward(distributed.wrap(lm, torch.device("cpu")), ids, idx, 6, "cpu", _null)
            rows.append(max((a.grad - b.grad).abs().max().item() / b.grad.abs().max().item()
                            for a, b in zip(lm.parameters(), ref_lm.parameters())))
            rows.append(abs(total - e2e.causal_lm_loss(ref_lm, ids[idx]).item() * len(idx)))
        torch.save(rows, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_split_batch_gradient_equals_the_whole_batch_gradient(tmp_path):
    mp.spawn(_grad_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "rows")), nprocs=2)
    for rank in range(2):
        rows = torch.load(tmp_path / f"rows.{rank}")
        assert len(rows) == 9
        assert max(rows) < 1e-5, rows


def _checks_worker(rank, world, store, out):
    _init(rank, world, store)
    seen = []
    try:
        distributed.check_same("same", {"a": torch.arange(4.0)})
        try:
            distributed.check_same("block 3", {"a": torch.full((4,), float(rank))})
        except RuntimeError as e:
            seen.append(str(e))

        def fail():
            raise ValueError("no space left")

        try:
            distributed.on_main(fail)
        except (ValueError, RuntimeError) as e:
            seen.append(f"{type(e).__name__}: {e}")
        assert distributed.on_main(lambda: 7) == (7 if rank == 0 else None)
        assert distributed.share(torch.arange(5)).tolist() == ([0, 2, 4] if rank == 0 else [1, 3])
        torch.save(seen, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_rank_divergence_and_rank0_failures_reach_every_rank(tmp_path):
    mp.spawn(_checks_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "seen")), nprocs=2)
    for rank in range(2):
        seen = torch.load(tmp_path / f"seen.{rank}")
        assert len(seen) == 2 and "block 3: the ranks' results differ" in seen[0]
        assert "no space left" in seen[1]  # rank 0 raises its own error, rank 1 hears of it


def test_one_process_is_not_distributed():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    m = nn.Linear(2, 2)
    assert distributed.wrap(m, torch.device("cpu")) is m
    assert distributed.share(torch.arange(3)).tolist() == [0, 1, 2]


def test_shares_of_a_batch():
    idx = torch.tensor([5, 1, 4, 0, 2])
    assert [(p.tolist(), f) for p, f in distributed.shares(idx)] == [([5, 1, 4, 0, 2], 1)]
    os.environ[distributed.SIMULATE_ENV] = "2"
    try:
        assert distributed.split_batches()
        assert [(p.tolist(), f) for p, f in distributed.shares(idx)] == [([5, 4, 2], 1), ([1, 0], 1)]
        assert [(p.tolist(), f) for p, f in distributed.shares(idx[:1])] == [([5], 1)]  # empty share left out
        os.environ[distributed.SIMULATE_ENV] = "two"
        with pytest.raises(ValueError, match="GQSA_SIMULATE_RANKS='two'"):
            distributed.simulated_ranks()
    finally:
        del os.environ[distributed.SIMULATE_ENV]
    assert not distributed.split_batches()


def _compress_one_and_two(stories260k, asset, tmp_path, extra, one_env=None):
    model, tok = stories260k
    calib = asset("data/wikitext2/wiki.valid.tokens")
    args = ["compress", str(model), "--tokenizer", str(tok), "--calib", str(calib), "--nsamples", "16",
            "--seqlen", "64", "--batch-size", "4", "--threads", THREADS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": THREADS}
    env.pop(distributed.SIMULATE_ENV, None)
    one = subprocess.run([sys.executable, "-m", "gqsa.cli", *args, "--out", str(tmp_path / "one")],
                         env={**env, **(one_env or {})}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          "2", "-m", "gqsa.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no work folder left behind
    return checkpoint.read_tensors(tmp_path / "one"), checkpoint.read_tensors(tmp_path / "two")


def test_two_rank_oneshot_is_bitwise_the_one_rank_result(stories260k, asset, tmp_path):
    """Without training steps, the 2-rank run (each rank compresses some of the linears of every
    group, the others receive them) is bitwise the 1-rank run."""
    a, b = _compress_one_and_two(stories260k, asset, tmp_path, ["--stages", "bqpo+e2e", "--bqpo-epochs", "0",
                                                                "--e2e-epochs", "0"])
    assert a.keys() == b.keys() and len(a) > 100
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_two_rank_compress_is_bitwise_the_simulated_two_rank_run(stories260k, asset, tmp_path):
    """``torchrun --nproc-per-node 2 gqsa compress`` with BQPO and E2E-OQP training steps vs one process
    with ``GQSA_SIMULATE_RANKS=2``: every tensor and every logged loss bit for bit equal.

    (Against a plain one-process run the result is not bitwise — a batch's gradient is then one
    reduction over the whole batch instead of the sum of the two ranks' halves — and how far the two
    drift apart after rounding to codes and re-choosing masks depends on the machine's BLAS; the
    gradient of a split batch is compared with the whole batch's in
    test_split_batch_gradient_equals_the_whole_batch_gradient.)"""
    a, b = _compress_one_and_two(stories260k, asset, tmp_path, ["--bqpo-epochs", "2", "--e2e-epochs", "1"],
                                 one_env={distributed.SIMULATE_ENV: "2"})
    r1, r2 = (json.loads((tmp_path / d / "gqsa_report.json").read_text()) for d in ("one", "two"))
    assert r1["world_size"] == 1 and r1["simulated_ranks"] == 2 and r2["world_size"] == 2
    assert len(r1["stages"]["bqpo"]) == len(r2["stages"]["bqpo"]) == 5
    for b1, b2 in zip(r1["stages"]["bqpo"], r2["stages"]["bqpo"], strict=True):
        assert b1["steps"] > 0
        for key in ("train_loss_before", "train_loss_after", "val_loss_before", "val_loss_after"):
            assert b2[key] == b1[key], (b1["block"], key)
    e1, e2 = r1["stages"]["e2e"], r2["stages"]["e2e"]
    assert e1["epochs"] and [r["train_loss"] for r in e1["epochs"]] == [r["train_loss"] for r in e2["epochs"]]
    assert e2["val_loss_after"] == e1["val_loss_after"]
    assert a.keys() == b.keys() and len(a) > 100
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
