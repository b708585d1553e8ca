#!/usr/bin/env python
"""The v2 GEMV's packed-fp16 dot (``half_dot``) emulated on the CPU: its error against the exact dot, next to the
fp32 dot's (whose only rounding that matters is the fp16 output), for W4 rows of random weights and activations, G16
(default) or any multiple of 16 (``--g 64``: a group is 4 units of 16 codes sharing its scale and zero point).

The emulation follows ``gemv_layout._PTX_HDOT16``: per unit of 16 codes, ``d = (q − z) / 16`` exactly in fp16;
two lanes (even and odd codes) each sum their 8 products ``x·d`` in fp16, one rounding per step (an fp16 fma:
the product of two fp16 values is exact in fp32, then the sum is rounded once to fp16); the two lane sums go
to fp32, times the fp16 scale, summed over the row's groups in fp32, × 16, and the row's result is rounded to
fp16. Two statistics:

* norm-wise over the rows of a layer (what ``benchmarks/gemv.py``'s GPU checks compute for many-row layers);
* per output element, over many draws of one row (what the checks compute for a layer with one non-empty row,
  e.g. the ``one_row`` case of ``--v2-batch``'s check): there the error is relative to a single sum, which is
  small whenever its terms cancel.

    PYTHONPATH=src python benchmarks/half_dot_numerics.py [--g 16] [--k 4096] [--rows 1024] [--draws 2000]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gqsa import quant  # noqa: E402

G = 16  # (--g)


def half_dot_rows(x: torch.Tensor, q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Emulated half-dot results (fp16, as float64) of rows ``q`` [n, c, G] (codes), ``z``, ``s`` [n, c] against
    ``x`` [c, G] (fp16 values as float32); G a multiple of 16: units of 16 codes, each two fp16 lanes."""
    n, c, g = q.shape
    d = ((q - z[..., None]) / 16).half().float().reshape(n, c, g // 16, 16)  # exact in fp16
    xu = x.reshape(c, g // 16, 16)
    lanes = []
    for par in (0, 1):
        a = (xu[None, ..., par] * d[..., par]).half()
        for e in range(1, 8):
            i = par + 2 * e
            a = (xu[None, ..., i] * d[..., i] + a.float()).half()
        lanes.append(a.float())
    units = (lanes[0] + lanes[1]).sum(-1)  # [n, c] (fp32: the kernel adds the units of a group in fp32 too)
    return ((units * s).sum(1) * 16).half().double()


def exact_rows(x, q, z, s) -> torch.Tensor:
    return (x.double()[None] * (q.double() - z.double()[..., None]) * s.double()[..., None]).sum((1, 2))


def layer(n: int, c: int, gen: torch.Generator):
    w = torch.randn(n, c, G, generator=gen)
    s, z = quant.minmax_params(w, 4)
    q = quant.quantize(w, s, z, 4).float()
    return q, z.reshape(n, c).float(), s.half().float().reshape(n, c)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--g", type=int, default=16, help="group size (a multiple of 16)")
    ap.add_argument("--k", type=int, default=4096, help="inputs of a row (a multiple of G)")
    ap.add_argument("--rows", type=int, default=1024, help="rows of the layer of the norm-wise statistic")
    ap.add_argument("--draws", type=int, default=2000, help="draws of x for the per-element statistic of one row")
    args = ap.parse_args()
    global G
    G = args.g
    gen = torch.Generator().manual_seed(0)
    c = args.k // G
    q, z, s = layer(args.rows, c, gen)
    x = torch.randn(c, G, generator=gen).half().float()
    ref = exact_rows(x, q, z, s)
    yh, y32 = half_dot_rows(x, q, z, s), ref.half().double()
    print(f"norm-wise relative error over {args.rows} rows of K = {args.k}, G = {G}: half dot "
          f"{float((yh - ref).norm() / ref.norm()):.2e}, fp32 dot (fp16 output) {float((y32 - ref).norm() / ref.norm()):.2e}; "
          f"largest |error| / rms(y): half dot {float((yh - ref).abs().max() / ref.pow(2).mean().sqrt()):.2e}")
    q1, z1, s1 = layer(1, c, gen)
    xs = torch.randn(args.draws, c, G, generator=gen).half().float()
    eh, e32 = [], []
    for t in range(args.draws):
        r = exact_rows(xs[t], q1, z1, s1)
        eh.append(float((half_dot_rows(xs[t], q1, z1, s1) - r).abs() / r.abs()))
        e32.append(float((r.half().double() - r).abs() / r.abs()))
    for name, v in (("half dot", torch.tensor(eh)), ("fp32 dot (fp16 output)", torch.tensor(e32))):
        print(f"one row, {args.draws} draws of x, relative error of the single output, {name}: median "
              f"{float(v.median()):.2e}, 90 % {float(v.quantile(0.9)):.2e}, 99 % {float(v.quantile(0.99)):.2e}, "
              f"share above 2e-3 {float((v > 2e-3).float().mean()):.3f}, above 5e-3 {float((v > 5e-3).float().mean()):.3f}")


if __name__ == "__main__":
    main()
