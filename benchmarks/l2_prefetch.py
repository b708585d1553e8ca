#!/usr/bin/env python
"""Does prefetching the next layer's weights into the L2 shorten a decode step? (issues 11, 12)

A chain shaped like LLaMA-2-7B decoding (per layer: a short kernel standing in for RMSNorm, the fused q/k/v
linear, a longer one for attention, o, RMSNorm, gate/up, SiLU·up, down; ``--layers`` distinct random GQSA
layers, far more bytes than the L2) is captured in one CUDA graph and timed per step, without and with an L2
prefetch of each linear's weights launched on a side stream when the linear before it starts
(:class:`L2Prefetch` below; tried in session 11 and not kept: no step got
shorter, benchmarks/RESULTS.md "Session 11"). The stand-ins spin on the SM clock (``--filler-us``) in 32 CTAs, the
way the decode step's attention / norm kernels occupy few SMs and little bandwidth.

    python benchmarks/l2_prefetch.py --out DIR [--settings w4s50g16,w4s50g16b64 --batches 1,4 --layers 8]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
import gemv as bg  # noqa: E402  (the CUDA-graph timing)

from gqsa.bench.synthetic import parse_setting, random_packed  # noqa: E402
from gqsa.kernels import dispatch  # noqa: E402

SHAPES_7B = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # q/k/v, o, gate/up, down
PREFETCH = r"""
// L2 prefetch of a layer's weights ahead of the kernel that reads them (launched by L2Prefetch below).
//
// `spans` holds n_spans (address, bytes) pairs, each address and size a multiple of 16. The grid's threads share
// the spans in chunks of `chunk` bytes (a multiple of 16); a thread issues one bulk prefetch per chunk (mode 0,
// sm_90: cp.async.bulk.prefetch.L2) or one prefetch.global.L2 per 128-byte line (mode 1, any GPU). Nothing is
// read back or written: the kernel only asks the memory system to bring the bytes into the L2.
extern "C" __global__ void gqsa_l2_prefetch(const long long* __restrict__ spans, int n_spans, int chunk, int mode)
{
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nth = (long long)gridDim.x * blockDim.x;
    for (int s = 0; s < n_spans; ++s) {
        const unsigned long long addr = (unsigned long long)spans[2 * s];
        const long long bytes = spans[2 * s + 1];
        for (long long off = tid * chunk; off < bytes; off += nth * chunk) {
            const long long rest = bytes - off;
            const int sz = rest < chunk ? (int)rest : chunk;
            const char* p = reinterpret_cast<const char*>(addr + off);
#if __CUDA_ARCH__ >= 900
            if (mode == 0) {
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(sz) : "memory");
                continue;
            }
#endif
            for (int o = 0; o < sz; o += 128)
                asm volatile("prefetch.global.L2 [%0];" :: "l"(p + o));
        }
    }
}
"""
CHUNK = 16384  # bytes per bulk prefetch
THREADS = 128


@functools.lru_cache(maxsize=None)
def _prefetch_kernel():
    return torch.cuda._compile_kernel(PREFETCH, "gqsa_l2_prefetch", nvcc_options=["-std=c++17"])


def spans(tensors, cap_bytes: int | None = None) -> list[tuple[int, int]]:
    """(address, bytes) of each distinct tensor's storage, 16-byte aligned inward, in order, the total capped at
    ``cap_bytes`` (the first bytes first)."""
    out, seen, total = [], set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        a, n = t.data_ptr(), t.numel() * t.element_size()
        if a in seen:
            continue
        seen.add(a)
        a16 = (a + 15) & ~15
        n = (n - (a16 - a)) & ~15
        if cap_bytes is not None:
            n = min(n, max(0, (cap_bytes - total) & ~15))
        if n > 0:
            out.append((a16, n))
            total += n
    return out


class L2Prefetch:
    """One launch that prefetches ``tensors`` (at most ``cap_bytes`` of them) into the L2. The tensors must stay
    alive and in place while the object is used (it keeps their addresses, not references)."""

    def __init__(self, tensors, device, cap_bytes: int | None = None, ctas: int = 16, mode: int = 0,
                 chunk: int = CHUNK):
        device = torch.device(device)
        sp = spans(tensors, cap_bytes)
        self.nbytes = sum(n for _, n in sp)
        if mode == 0 and torch.cuda.get_device_capability(device) < (9, 0):
            mode = 1
        self.args_t = torch.tensor([v for s in sp for v in s] or [0, 0], dtype=torch.int64, device=device)
        self.n, self.chunk, self.mode, self.ctas = len(sp), chunk, mode, ctas
        self.kern = _prefetch_kernel()

    def __call__(self) -> None:
        if self.n:
            self.kern(grid=(self.ctas, 1, 1), block=(THREADS, 1, 1),
                      args=[self.args_t, self.n, self.chunk, self.mode])


SPIN = r"""
extern "C" __global__ void spin(int cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


def build(setting, layers, dev):
    st = parse_setting(setting)
    gen = torch.Generator(device=dev).manual_seed(0)
    plans = []
    for _ in range(layers):
        for (n, k) in SHAPES_7B:
            p = random_packed(n, k, st.sparsity, st.bits, st.group_size, dev, gen, block_rows=st.block_rows or 0,
                              clustered=st.clustered)
            plans.append(dispatch.LinearPlan(p))
    return plans


def step_fn(plans, xs, spin, fill, pfs, side):
    """One decode-step-like chain; ``pfs``: a prefetch per linear (or None), launched on ``side`` when the
    linear before it starts."""
    main = torch.cuda.current_stream()
    fills = [fill[0], fill[1], fill[0], fill[2]]  # before q/k/v, o, gate/up, down: norm, attention, norm, silu

    def run():
        for i, pl in enumerate(plans):
            j = i % 4
            if fills[j]:
                spin(grid=(32, 1, 1), block=(128, 1, 1), args=[fills[j]])
            if pfs is not None:  # the next linear's weights (the last one's: the first of the next step)
                nxt = pfs[(i + 1) % len(plans)]
                ev = torch.cuda.Event()
                ev.record(main)
                side.wait_event(ev)
                with torch.cuda.stream(side):
                    nxt()
            pl(xs[pl.packed.shape[1]])
        if pfs is not None:
            main.wait_stream(side)
    return run


def t_step(run, replays=20):
    """µs per step: one CUDA graph of ``run``, median of ``replays`` replays (``gemv.t_graph`` of one call)."""
    return bg.t_graph([run], min_calls=1, replays=replays)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="w4s50g16,w4s50g16b64")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--filler-us", default="2,6,1.2", help="norm, attention, SiLU stand-ins (µs; 0: none)")
    ap.add_argument("--caps-mb", default="0,24", help="prefetch caps per linear, MB (0: all its bytes)")
    ap.add_argument("--ctas", default="16,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (8, 0):
        sys.exit("this experiment needs a CUDA GPU of compute capability 8.0 or later")
    spin = torch.cuda._compile_kernel(SPIN, "spin")
    clk = 1980000  # kHz: the H200's SM clock (the stand-ins only need to be about right)
    fus = [float(v) for v in args.filler_us.split(",")]
    side = torch.cuda.Stream()
    records = []
    for setting in args.settings.split(","):
        plans = build(setting, args.layers, dev)
        wbytes = sum(p.packed.nbytes() for p in plans)
        for m in [int(b) for b in args.batches.split(",")]:
            xs = {k: torch.randn(m, k, device=dev, dtype=torch.float16) for k in {s[1] for s in SHAPES_7B}}
            for pl in plans:
                pl(xs[pl.packed.shape[1]])
            torch.cuda.synchronize()
            paths = sorted({pl.path(m) for pl in plans})
            calls = [next(iter(pl._calls.values())) for pl in plans]
            fill = [int(u * clk / 1000) for u in fus]
            nofill = [0, 0, 0]
            res = {"setting": setting, "M": m, "paths": paths, "layers": args.layers, "weight_MB": wbytes / 1e6}
            res["linears only"] = t_step(step_fn(plans, xs, spin, nofill, None, side))
            res["fillers only"] = t_step(lambda: [spin(grid=(32, 1, 1), block=(128, 1, 1), args=[f])
                                                  for _ in range(args.layers) for f in (fill[0], fill[1], fill[0],
                                                                                        fill[2]) if f])
            res["chain"] = t_step(step_fn(plans, xs, spin, fill, None, side))
            for cap in [float(c) for c in args.caps_mb.split(",")]:
                for ctas in [int(c) for c in args.ctas.split(",")]:
                    for mode in (0, 1):
                        pfs = [L2Prefetch(c.weights, dev, cap_bytes=int(cap * 1e6) or None, ctas=ctas,
                                                   mode=mode) for c in calls]
                        key = f"pf cap{cap:g} ctas{ctas} {'bulk' if mode == 0 else 'line'}"
                        res["chain " + key] = t_step(step_fn(plans, xs, spin, fill, pfs, side))
                        if cap == 0 and ctas == int(args.ctas.split(",")[0]):
                            res["linears " + key] = t_step(step_fn(plans, xs, spin, nofill, pfs, side))
            res["prefetch alone (last variant)"] = t_step(lambda: [p() for p in pfs])
            records.append(res)
            print(json.dumps(res), flush=True)
        del plans
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "l2_prefetch.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
