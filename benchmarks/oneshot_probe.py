"""Probe of the one-shot group pruning (issue 13): run GQSA's one-shot loop on a model with a chosen
per-layer compressor and print the held-out perplexity of the resulting dense-equivalent model.

usage: python benchmarks/oneshot_probe.py MODEL VARIANT [VARIANT ...] [--bits 4] [--sparsity 0.5]
       [--group-size 16] [--nsamples 32] [--seqlen 512] [--windows 16]

MODEL: a folder or .gguf file. Calibration: ASSETS/data/gutenberg/calib.txt; perplexity: the first
``--windows`` windows of ``--seqlen`` tokens of ASSETS/data/gutenberg/heldout.txt (GPTQ protocol).
VARIANT: ``fp`` (uncompressed), or a ``mask_method`` of :func:`gqsa.prune.compress_weight` (``fixed``,
``adaptive``, ...), optionally ``+noquant`` (prune and compensate only, kept weights unquantized).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from gqsa import blockwise, calib, prune
from gqsa import oneshot as gqsa_oneshot
from gqsa.config import GQSAConfig
from gqsa.eval.ppl import perplexity
from gqsa.models import load_model
from gqsa.models.adapters import get_adapter

ASSETS = os.environ.get("ASSETS", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets"))


@torch.no_grad()
def oneshot(model, config, tokens, mask_method: str, quantize: bool, batch_size: int = 8) -> None:
    """GQSA's one-shot loop (gqsa.oneshot.compress_oneshot) without packing: weights replaced in place."""
    adapter = get_adapter(model)
    orig = prune.compress_weight

    def patched(*args, **kw):
        kw.update(mask_method=mask_method, quantize=quantize)
        return orig(*args, **kw)

    prune.compress_weight = patched

    def method(i, block, prefix, batches):
        groups = blockwise.block_linear_groups(adapter, block, prefix, i, config)
        gqsa_oneshot.oneshot_block(block, adapter, groups, batches, config)

    try:
        blockwise.run_blocks(model, tokens, "cpu", batch_size, method, desc="one-shot probe", progress=False)
    finally:
        prune.compress_weight = orig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("variants", nargs="+")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--saliency", default="hessian")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--target-bits", type=float, default=None, help="per-layer sparsity under this budget")
    a = p.parse_args()
    base, tok = load_model(a.model)
    tokens = calib.calibration_tokens(os.path.join(ASSETS, "data/gutenberg/calib.txt"), tok, a.nsamples, a.seqlen, 0)
    heldout = os.path.join(ASSETS, "data/gutenberg/heldout.txt")
    for v in a.variants:
        t0 = time.time()
        model = copy.deepcopy(base)
        if v != "fp":
            method, _, opt = v.partition("+")
            config = GQSAConfig(bits=a.bits, group_size=a.group_size, sparsity=a.sparsity, saliency=a.saliency,
                                damp=a.damp, stages="oneshot", target_bits=a.target_bits)
            if a.target_bits is not None:
                from gqsa.allocation import apply_target_bits

                chosen = apply_target_bits(model, config, tokens, "cpu")
                print("layer sparsity:", {k: round(v, 3) for k, v in chosen.items()}, flush=True)
            oneshot(model, config, tokens, method, quantize=opt != "noquant")
        t1 = time.time()
        r = perplexity(model, tok, heldout, context=a.seqlen, max_windows=a.windows, progress=False)
        tb = f" target-bits {a.target_bits:g}" if a.target_bits else ""
        print(f"{os.path.basename(a.model.rstrip('/'))} W{a.bits} S{a.sparsity:g}{tb} G{a.group_size} {a.saliency} "
              f"{v}: ppl {r['ppl']:.2f} ({r['windows']} windows; compress {t1 - t0:.0f} s)", flush=True)
        del model


if __name__ == "__main__":
    main()
