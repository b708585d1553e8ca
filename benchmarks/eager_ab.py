#!/usr/bin/env python
"""Eager (not CUDA-graphed) GQSA layers with and without the prepared launches of ``LinearPlan``, side by
side in one process: the engine's prefill, and decoding with transformers' own ``generate()``.

For every setting a synthetic model and its ``Engine`` are built once; then, ``--repeats`` times, with the
prepared calls off (``dispatch.MAX_PREPARED = 0`` and every plan's prepared calls dropped: each call builds
its launch and goes through ``jit.launch``'s fast path, as before the prepared calls) and on:

* one engine prefill of ``--prompt-len`` tokens (a generation of 1 token: ``GenerationOutput.prefill_s``,
  synchronized);
* with ``--hf-tokens N``, transformers' ``model.generate`` (greedy, eager, its own cache) of 1 and of N + 1
  new tokens after a 32-token prompt: decode tokens/s = N / (difference of the two walls).

The modes alternate, so drift of the host hits both; each switch to "prepared" is followed by one untimed
run (the calls are prepared there). fp16 rows have no GQSA layers: both columns time the same thing there
(a measure of the noise).

    PYTHONPATH=src python benchmarks/eager_ab.py --settings fp16,w4s50g16,w4s50g16b128 --prompt-len 512 --hf-tokens 32
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gqsa.bench.synthetic import build_synthetic, parse_setting  # noqa: E402
from gqsa.engine import Engine  # noqa: E402
from gqsa.kernels import dispatch  # noqa: E402
from gqsa.nn import GQSALinear  # noqa: E402

DEFAULT_MAX = dispatch.MAX_PREPARED


def set_prepared(model, on: bool) -> None:
    dispatch.MAX_PREPARED = DEFAULT_MAX if on else 0
    for m in model.modules():
        if isinstance(m, GQSALinear) and m._plan is not None:
            m._plan._calls.clear()


def hf_decode(model, ids: torch.Tensor, tokens: int) -> float:
    """Tokens/s of transformers' ``generate()`` past the first new token (greedy, eager)."""
    walls = []
    for new in (1, tokens + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    return tokens / (walls[1] - walls[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-2-7b", help="synthetic architecture (default llama-2-7b)")
    ap.add_argument("--settings", default="fp16,w4s50g16,w4s50g16b128")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--hf-tokens", type=int, default=0, help="also time transformers' generate() decoding this many tokens")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("eager_ab: needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    for name in args.settings.split(","):
        model = build_synthetic(args.arch, parse_setting(name), dev, seed=0)
        engine = Engine(model, compile_ops="auto", fuse_projections="auto", cuda_graphs="auto", decode_kernels="auto")
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
        ids = torch.tensor(prompts, device=dev)[:, :32]
        times = {f"{what}_{mode}": [] for what in ("prefill", "hf") for mode in ("unprepared", "prepared")}
        for on in (True, False, True):  # compile and warm both paths
            set_prepared(model, on)
            engine.generate(prompts, 1)
            engine.generate(prompts, 1)
            if args.hf_tokens:
                hf_decode(model, ids, args.hf_tokens)
        for _ in range(args.repeats):
            for mode in ("unprepared", "prepared"):
                set_prepared(model, mode == "prepared")
                if mode == "prepared":
                    engine.generate(prompts, 1)  # the calls are prepared here
                times[f"prefill_{mode}"].append(1e3 * engine.generate(prompts, 1).prefill_s)
                if args.hf_tokens:
                    times[f"hf_{mode}"].append(hf_decode(model, ids, args.hf_tokens))
        set_prepared(model, True)
        row = {"setting": name, "batch": args.batch, "prompt_len": args.prompt_len, "hf_tokens": args.hf_tokens}
        for key, t in times.items():
            if t:
                row[f"{key}_median"] = round(statistics.median(t), 2)
                row[key] = [round(v, 2) for v in t]
        rows.append(row)
        print(f"{name:14s} engine prefill {args.batch}x{args.prompt_len} ms: prepared {row['prefill_prepared_median']:7.2f}, "
              f"unprepared {row['prefill_unprepared_median']:7.2f}" + (
                  f"; transformers generate() decode tokens/s: prepared {row['hf_prepared_median']:.1f}, unprepared "
                  f"{row['hf_unprepared_median']:.1f}" if args.hf_tokens else ""), flush=True)
        engine.release()
        del engine, model
        torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
