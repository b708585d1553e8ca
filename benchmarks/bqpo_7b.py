"""BQPO speed and memory on LLaMA-2-7B / 70B-shaped blocks with random weights (no download).

Builds the first ``--blocks`` decoder blocks of a LLaMA-2-7B (or 70B: hidden 8192, MLP 28672, 64
heads, 8 KV heads) model directly on the GPU, moves the model to CPU memory (where a real run keeps
it), and runs one-shot + BQPO over those blocks on ``--nsamples × --seqlen`` random calibration
tokens with one block at a time on the GPU — the library path of ``gqsa compress --stages bqpo``.
Speed and memory do not depend on the weights' values. Early stopping is disabled (patience =
epochs) so every block runs all its epochs: the time is the worst case of the setting.

    python benchmarks/bqpo_7b.py --shape 7b --blocks 2 --out bqpo_7b.json
    python benchmarks/bqpo_7b.py --shape 70b --blocks 1 --epochs 2 --activation-dtype bfloat16
    python benchmarks/bqpo_7b.py --tiny --device cpu       # a smoke test of the script itself
    torchrun --standalone --nproc-per-node 4 benchmarks/bqpo_7b.py --shape 7b --blocks 2 --out bqpo_7b_x4.json
                                                           # data-parallel BQPO over 4 GPUs (rank 0 reports)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2),
}
BLOCKS = {"7b": 32, "70b": 80, "tiny": 2}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=("7b", "70b"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test on CPU)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=20, help="BQPO epochs per block (the default setting: 20)")
    ap.add_argument("--bqpo-batch-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="windows per calibration forward pass")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--activation-dtype", default="float32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    from gqsa import GQSAConfig, distributed
    from gqsa.pipeline import compress_model
    from gqsa.report import environment

    shape = "tiny" if args.tiny else args.shape
    if args.tiny:
        args.nsamples, args.seqlen = min(args.nsamples, 8), min(args.seqlen, 64)
    device = distributed.setup(args.device) if distributed.launched() else torch.device(args.device)
    cfg = LlamaConfig(vocab_size=32000 if not args.tiny else 512, num_hidden_layers=args.blocks,
                      max_position_embeddings=max(4096, args.seqlen), rms_norm_eps=1e-5, **SHAPES[shape])
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()  # random weights, made on the GPU
    model.to("cpu")  # where a real run keeps the model: only the current block goes to the GPU
    build_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tokens = torch.randint(0, cfg.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    config = GQSAConfig(bits=4, group_size=16, sparsity=args.sparsity, stages="bqpo", bqpo_epochs=args.epochs,
                        bqpo_patience=max(1, args.epochs), bqpo_batch_size=args.bqpo_batch_size,
                        activation_dtype=args.activation_dtype)
    stats = {}
    t = time.perf_counter()
    compress_model(model, config, tokens, device, batch_size=args.batch_size, progress=False, stats=stats, log=print)
    total_s = time.perf_counter() - t
    if not distributed.is_main():
        distributed.teardown()
        return
    blocks = stats["bqpo"]
    per_block = sum(b["seconds"] for b in blocks) / len(blocks)
    train_per_epoch = sum((b["seconds"] - b["oneshot_seconds"]) / max(1, b["epochs_run"]) for b in blocks) / len(blocks)
    oneshot = sum(b["oneshot_seconds"] for b in blocks) / len(blocks)
    peak = max(b["peak_memory_bytes"] for b in blocks)
    n_full = BLOCKS[shape]
    result = {
        "shape": shape, "blocks_run": len(blocks), "blocks_in_model": n_full, "nsamples": args.nsamples,
        "seqlen": args.seqlen, "epochs": args.epochs, "bqpo_batch_size": args.bqpo_batch_size,
        "activation_dtype": args.activation_dtype, "config": config.to_dict(), "device": str(device),
        "world_size": distributed.world_size(),
        "build_seconds": round(build_s, 1), "total_seconds": round(total_s, 1),
        "seconds_per_block": round(per_block, 1), "wall_seconds_per_block": round(total_s / len(blocks), 1),
        "oneshot_seconds_per_block": round(oneshot, 1),
        "train_seconds_per_epoch": round(train_per_epoch, 2),
        "seconds_per_block_at_20_epochs": round(oneshot + 20 * train_per_epoch, 1),
        "peak_memory_gib": round(peak / 2**30, 2), "peak_memory_kind": blocks[0]["peak_memory_kind"],
        "whole_model_hours_at_20_epochs": round(n_full * (oneshot + 20 * train_per_epoch) / 3600, 2),
        "blocks": blocks, "environment": environment(),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("blocks", "config")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    distributed.teardown()


if __name__ == "__main__":
    main()
