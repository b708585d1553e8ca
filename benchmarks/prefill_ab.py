#!/usr/bin/env python
"""Prefill wall time with and without the prepared launches of ``LinearPlan``, side by side in one process.

For every setting a synthetic model and its ``Engine`` are built once; then, ``--repeats`` times, one
prefill (a generation of 1 token: ``GenerationOutput.prefill_s``, synchronized) with the prepared calls
on and one with them off (``dispatch.MAX_PREPARED = 0`` and every plan's prepared calls dropped: each
call builds its ``BlockCall`` / ``GemmCall`` and launches through ``jit.launch``'s fast path, as
before the prepared calls). The two modes alternate, so drift of the host hits both; each switch to
"prepared" is followed by one untimed prefill (the calls are prepared there). fp16 rows have no GQSA
layers: both columns time the same thing there (a measure of the noise).

    PYTHONPATH=src python benchmarks/prefill_ab.py --settings fp16,w4s50g16,w4s50g16b128 --prompt-len 512
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gqsa.bench.synthetic import build_synthetic, parse_setting  # noqa: E402
from gqsa.engine import Engine  # noqa: E402
from gqsa.kernels import dispatch  # noqa: E402
from gqsa.nn import GQSALinear  # noqa: E402


def set_prepared(model, on: bool) -> None:
    dispatch.MAX_PREPARED = DEFAULT_MAX if on else 0
    for m in model.modules():
        if isinstance(m, GQSALinear) and m._plan is not None:
            m._plan._calls.clear()


DEFAULT_MAX = dispatch.MAX_PREPARED


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-2-7b", help="synthetic architecture (default llama-2-7b)")
    ap.add_argument("--settings", default="fp16,w4s50g16,w4s50g16b128")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("prefill_ab: needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = []
    for name in args.settings.split(","):
        model = build_synthetic(args.arch, parse_setting(name), dev, seed=0)
        engine = Engine(model, compile_ops="auto", fuse_projections="auto", cuda_graphs="auto", decode_kernels="auto")
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
        times = {"prepared": [], "unprepared": []}
        for on in (True, False, True):  # compile and warm both paths
            set_prepared(model, on)
            engine.generate(prompts, 1)
            engine.generate(prompts, 1)
        for _ in range(args.repeats):
            for mode in ("unprepared", "prepared"):
                set_prepared(model, mode == "prepared")
                if mode == "prepared":
                    engine.generate(prompts, 1)  # the calls are prepared here
                times[mode].append(1e3 * engine.generate(prompts, 1).prefill_s)
        set_prepared(model, True)
        row = {"setting": name, "batch": args.batch, "prompt_len": args.prompt_len}
        for mode, t in times.items():
            row[f"{mode}_median_ms"] = round(statistics.median(t), 2)
            row[f"{mode}_min_ms"] = round(min(t), 2)
            row[f"{mode}_ms"] = [round(v, 2) for v in t]
        rows.append(row)
        print(f"{name:14s} prefill {args.batch}x{args.prompt_len}: prepared median {row['prepared_median_ms']:7.2f} ms "
              f"(min {row['prepared_min_ms']:.2f}), unprepared median {row['unprepared_median_ms']:7.2f} ms "
              f"(min {row['unprepared_min_ms']:.2f})", flush=True)
        engine.release()
        del engine, model
        torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
