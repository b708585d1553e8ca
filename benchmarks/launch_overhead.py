#!/usr/bin/env python
"""CPU cost of one GQSA linear call against ``F.linear`` (CUDA): what bounds an eager prefill.

Builds one layer of a synthetic model (a ``gqsa bench`` setting, e.g. ``w4s50g16b128``), then times
``--calls`` calls back to back: the CPU time to enqueue them (no synchronization inside) and the time
until the GPU has finished too. Where the two are equal the GPU waits for the CPU. Prints the fast-path
cache size of :mod:`gqsa.kernels.jit` before and after (it must not grow: a growing cache means every
call compiles or takes Triton's slow launch path) and a cProfile of the GQSA calls.

    PYTHONPATH=src python benchmarks/launch_overhead.py --setting w4s50g16b128 --m 512
    PYTHONPATH=src python benchmarks/launch_overhead.py --stub   # no GPU: jit.launch alone, compiler stubbed
"""
import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gqsa.bench.synthetic import build_synthetic, parse_setting  # noqa: E402
from gqsa.kernels import jit  # noqa: E402
from gqsa.nn import GQSALinear  # noqa: E402


def per_call(fn, calls: int) -> tuple[float, float]:
    """(CPU µs to enqueue one call, µs per call until the GPU is done)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    cpu = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e6 * cpu / calls, 1e6 * (time.perf_counter() - t) / calls


def stubbed_launch(calls: int = 20000) -> tuple[float, float]:
    """µs per ``jit.launch`` fast-path call of a 20-argument block-kernel launch, and per call of the same
    launch bound (``jit.bind``, what a prepared call runs), with the compiled kernel and the stream lookup
    stubbed (no GPU needed: the Python cost alone)."""
    import triton.runtime.driver

    class Compiled:
        function = packed_metadata = None

        def launch_metadata(self, *a):
            return None

        def run(self, *a):
            pass

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: Compiled()

    class Stream:
        def get_current_stream(self, index):
            return 0

    triton.runtime.driver.set_active(Stream())
    dev = torch.device("cuda", 0)
    x = torch.zeros(512, 4096, dtype=torch.float16)
    ts = [torch.zeros(1000, dtype=t) for t in (torch.uint8, torch.int32, torch.int32, torch.int32, torch.int32)]
    args = (x, *ts, x, x, x, ts[1], x, 512, 4096, 4096, 12, 1, 4096, 4096, 32, 2048)
    consts = dict(R=128, G=16, BITS=4, BLOCK_M=128, NP=4, STEPS=0, SPLIT=False, HAS_BIAS=False, SCALE_AFTER=False,
                  DOT_F32=False, FLOAT_Z=False, FP16=True, ASM=True, COL_VEC=False, ROW_MAP=False, WIDE=False,
                  PRE=True, BLOCK_OUT=False)
    k = Kernel()
    bound = jit.bind(k, (4, 32, 1), args, consts, dev, 8, 3, pdl="block")
    t = time.perf_counter()
    for _ in range(calls):
        jit.launch(k, (4, 32, 1), args, consts, dev, 8, 3, pdl="block")
    t1 = time.perf_counter()
    for _ in range(calls):
        bound(*args)
    return 1e6 * (t1 - t) / calls, 1e6 * (time.perf_counter() - t1) / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="w4s50g16b128", help="a gqsa bench synthetic setting (default w4s50g16b128)")
    ap.add_argument("--arch", default="llama-2-7b-layers=1", help="synthetic architecture (default one 7B layer)")
    ap.add_argument("--m", type=int, default=512, help="rows of x (default 512: a prefill)")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--stub", action="store_true", help="no GPU: time jit.launch's fast path with the compiler stubbed")
    args = ap.parse_args()
    if args.stub:
        fast, bound = stubbed_launch()
        print(f"jit.launch fast path (stubbed): {fast:.2f} us per call; a prepared call's jit.Bound: {bound:.2f} us")
        return
    if not torch.cuda.is_available():
        sys.exit("launch_overhead: needs a CUDA GPU")
    model = build_synthetic(args.arch, parse_setting(args.setting), torch.device("cuda"), seed=0)
    lin = next(m for m in model.modules() if isinstance(m, GQSALinear))
    x = torch.randn(args.m, lin.in_features, device="cuda", dtype=torch.float16)
    w = torch.randn(lin.out_features, lin.in_features, device="cuda", dtype=torch.float16)
    for _ in range(3):  # compile, fill the fast path and the allocator's cache
        lin(x)
        F.linear(x, w)
    n0 = len(jit._FAST)
    print(f"{args.setting} layer {lin.out_features}x{lin.in_features}, M = {args.m}, path {lin._plan.path(args.m)}")
    for name, fn in (("GQSALinear", lambda: lin(x)), ("F.linear fp16", lambda: F.linear(x, w))):
        cpu, tot = per_call(fn, args.calls)
        print(f"  {name:14s} CPU {cpu:7.1f} us per call, GPU done {tot:7.1f} us per call")
    print(f"  fast-path entries {n0} -> {len(jit._FAST)}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(args.calls):
        lin(x)
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
