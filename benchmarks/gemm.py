#!/usr/bin/env python
"""GQSA at every batch size (issue 11): cuBLAS fp16, torch tinygemm int4 g128 and GQSA W4 G16 (S50, S30)
side by side in one process, for the LLaMA-2-7B / LLaMA-3-8B / LLaMA-2-70B linear shapes and
M = 1, 2, 4, 8, 16, 32, 64, 256, 2048.

Every method runs over weight copies rotated beyond the L2 (``--rot-bytes``) and is timed by CUDA-graph
replay of back-to-back calls (µs per call, median of 15 replays; ``benchmarks/gemv.py``'s ``t_graph``).
GQSA runs through :class:`gqsa.kernels.dispatch.LinearPlan` (what ``GQSALinear`` holds): the GEMV at
batch 1, the tensor-core GEMM above; at M ≤ 4 both kernels are also timed forced (the crossover).
Roofline: the bytes a method must move (its weight format, read once, plus x and y) over the
device-to-device copy bandwidth measured in the same run; at large M the kernels are compute-bound
and the TFLOP/s column is the one to read.

    python benchmarks/gemm.py --check                 # GPU correctness of the dispatch paths
    python benchmarks/gemm.py --sweep --out DIR       # GemmConfig candidates per M on 3 shapes
    python benchmarks/gemm.py --out DIR               # the matrix (gemm.json, gemm.md)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
import gemv as bg  # noqa: E402  (benchmarks/gemv.py: shapes, random layers, timing helpers)

from gqsa import format as fmt  # noqa: E402
from gqsa import quant  # noqa: E402
from gqsa.kernels import block_gemm, dispatch, gemm, reference  # noqa: E402
from gqsa.kernels import gemv as gemv_k  # noqa: E402
from gqsa.kernels.block_layout import build_block_layout, detect_row_clusters  # noqa: E402
from gqsa.bench.synthetic import random_packed  # noqa: E402
from gqsa.kernels.layout import build_tile_layout  # noqa: E402

DEV = "cuda"
BATCHES = [1, 2, 4, 8, 16, 32, 64, 256, 2048]


def _check_launch(launch, shape, dt, ref):
    """Run ``launch(y)`` into a NaN-poisoned ``y``; (ok, relative error or the exception) against ``ref``."""
    y = torch.full(shape, float("nan"), device=DEV, dtype=dt)
    try:
        launch(y)
        torch.cuda.synchronize()
        err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))
        return bool(torch.isfinite(y).all()) and err < (1e-2 if dt == torch.bfloat16 else 2e-3), err
    except Exception as e:  # noqa: BLE001
        return False, repr(e)[:300]


def layer_for_check(n, k, g, bits, sparsity, float_zeros=False, special=None, seed=0, device=DEV, rows=None):
    gen = torch.Generator().manual_seed(seed)
    c = math.ceil(k / g)
    w = torch.randn(n, c, g, generator=gen)
    if k % g:
        valid = (torch.arange(c * g).reshape(c, g) < k)[None]
        s, z = quant.minmax_params(w, bits, valid=valid)
    else:
        s, z = quant.minmax_params(w, bits)
    if float_zeros:
        z = z + torch.rand(z.shape, generator=gen) * 0.8 - 0.4
    q = quant.quantize(w, s, z, bits)
    mask = torch.rand(n, c, generator=gen) >= sparsity
    if special == "empty_rows":
        mask[::3] = False
    elif special == "uneven":  # row r keeps about r/n of its groups
        mask = torch.rand(n, c, generator=gen) < torch.linspace(0, 1, n)[:, None]
    if rows:  # block-uniform: the mask of each block's first row for the whole block
        mask = mask[::rows].repeat_interleave(rows, dim=0)[:n]
        if special == "cluster":  # the same blocks, rows shuffled: clusters of R non-consecutive rows
            mask = mask[torch.randperm(n, generator=gen)]
    p = fmt.pack(q, s, z, mask, (n, k), bits, g, float_zeros=float_zeros)
    return fmt.PackedLinear(**{a: t.to(device) for a, t in p.tensors().items()}, shape=p.shape, bits=p.bits,
                            group_size=p.group_size)


def gpu_check(quick: bool = False) -> bool:
    ok = True
    cases = [(300, 1000, 16, 4, 0.5, False, None), (256, 4096, 16, 4, 0.5, False, "uneven"),
             (200, 520, 32, 2, 0.4, True, "empty_rows"), (96, 777, 64, 8, 0.3, False, None),
             (130, 1024, 128, 4, 0.6, True, None), (1000, 2048, 16, 4, 0.5, False, None)]
    table = dispatch.default_table()
    if quick:
        cases = [cases[0], cases[2]]
    for (n, k, g, bits, sp, fz, special) in cases:
        p = layer_for_check(n, k, g, bits, sp, fz, special)
        lay = build_tile_layout(p)
        lay_c = build_tile_layout(p, canonical=True)  # layout version 3 (GQSA_TILE_LAYOUT=canonical)
        for dt in (torch.float16, torch.bfloat16):
            w_ref = reference.dequantize(p, dt).float()
            for m in (3, 16, 100) if quick else (1, 3, 16, 33, 100, 600):
                x = torch.randn(m, k, device=DEV).to(dt)
                bias = torch.randn(n, device=DEV).to(dt) if m % 2 else None
                ref = x.float() @ w_ref.t() + (bias.float() if bias is not None else 0)
                cfgs = {"table": table.config(m), "split3": gemm.GemmConfig(16, 32, split_k=3),
                        "f32deq": gemm.GemmConfig(32, 64, deq16=False),
                        "prefetch": gemm.GemmConfig(16, 128, prefetch=True),
                        "halves": gemm.GemmConfig(32, 128, prefetch=True, maxnreg=128, halves=True)}
                runs = [(c, lay, cfg) for c, cfg in cfgs.items()]
                runs += [("canonical " + c, lay_c, cfgs[c]) for c in ("table", "halves")]
                for cname, lay_r, cfg in runs:
                    good, err = _check_launch(lambda y: gemm.launch_gemm(x, lay_r, bias, y, cfg), (m, n), dt, ref)
                    if not good:
                        ok = False
                        print(f"CHECK FAIL {n}x{k} G{g} b{bits} {special} {dt} M={m} {cname}: {err}", flush=True)
        ws = gemm.workspace(torch.device(DEV))
        if bool(ws.partial.any()) or bool(ws.counters.any()):
            ok = False
            print("CHECK FAIL: split-K workspace not clean after launches", flush=True)
        print(f"check {n}x{k} G{g} b{bits} float zeros {fz} {special}: done", flush=True)  # progress
    # the plan, in a CUDA graph
    p = layer_for_check(512, 1024, 16, 4, 0.5)
    plan = dispatch.LinearPlan(p)
    for m in (1, 4, 16, 64):
        x = torch.randn(m, 1024, device=DEV, dtype=torch.float16)
        y0 = plan(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = plan(x)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        ref = reference.linear(x.float(), p)
        err = float((yg.float() - ref).norm() / ref.norm())
        if not err < 2e-3:
            ok = False
            print(f"CHECK FAIL graph M={m}: {err}", flush=True)
        del y0
    # the plan's prepared calls (one per batch shape, the compiled kernel bound after the first launch; the v2
    # GEMV, the irregular GEMM, the dense expansion, the block kernel with and without the pre pass):
    # the same shapes again with new data, with and without a bias (first launch, then the bound kernel),
    # and x 2 bytes off alignment (the checked launch); x [1, M, K] as in a model
    for special, rows in ((None, None), ("uneven", 128), ("cluster", 128)):
        p = layer_for_check(1024, 2048, 16, 4, 0.5, special=special, rows=rows)
        plan = dispatch.LinearPlan(p)
        for m in (1, 3, 6, 40, 300):
            for rep in range(5):
                big = torch.randn(1, m, 2056, device=DEV, dtype=torch.float16)  # rows 16-byte aligned
                x = big[..., 1:2049] if rep == 2 else big[..., :2048]
                bias = None if rep in (0, 4) else torch.randn(1024, device=DEV, dtype=torch.float16)
                ref = reference.linear(x[0].float(), p, None if bias is None else bias.float())
                y = plan(x, bias)
                torch.cuda.synchronize()
                err = float((y[0].float() - ref).norm() / ref.norm()) if y.shape == (1, m, 1024) else y.shape
                if not (y.shape == (1, m, 1024) and bool(torch.isfinite(y).all()) and err < 2e-3):
                    ok = False
                    print(f"CHECK FAIL prepared {special} rows={rows} M={m} rep {rep} ({plan.path(m)}): {err}",
                          flush=True)
        if len(plan._calls) != 10:  # with and without a bias at each M
            ok = False
            print(f"CHECK FAIL prepared {special}: {len(plan._calls)} prepared calls", flush=True)
    print("GPU check:", "all ok" if ok else "FAILURES", flush=True)
    return ok


BLOCK_CHECK_CASES = [  # n, k, G, bits, sparsity, float zeros, special, rows
    (300, 1000, 16, 4, 0.5, False, None, 16), (256, 4096, 16, 4, 0.5, False, "uneven", 16),
    (200, 520, 32, 2, 0.4, True, None, 32), (96, 777, 64, 8, 0.3, False, None, 64),
    (130, 1024, 128, 4, 0.6, True, None, 16), (1000, 2048, 16, 4, 0.5, False, None, 64),
    (1024, 2048, 16, 4, 0.5, False, "uneven", 128), (512, 1024, 16, 4, 0.5, False, "cluster", 64),
]


def block_check(configs_for_m, quick=False) -> bool:
    """GPU correctness of the block kernels for every config ``configs_for_m(m, rows)`` yields."""
    ok = True
    cases = [BLOCK_CHECK_CASES[i] for i in (0, 2, 3, 7)] if quick else BLOCK_CHECK_CASES
    for (n, k, g, bits, sp, fz, special, rows) in cases:
        p = layer_for_check(n, k, g, bits, sp, fz, special, rows=rows)
        if special == "cluster":  # through the row map (--allocation clusterR)
            r, row_map = detect_row_clusters(p)
            lay = build_block_layout(p, r, row_map=row_map)
        else:
            lay = build_block_layout(p)
        for dt in (torch.float16, torch.bfloat16):
            w_ref = reference.dequantize(p, dt).float()
            for m in (1, 16, 100) if quick else (1, 3, 16, 100, 600):
                x = torch.randn(m, k, device=DEV).to(dt)
                bias = torch.randn(n, device=DEV).to(dt) if m % 2 else None
                ref = x.float() @ w_ref.t() + (bias.float() if bias is not None else 0)
                for cfg in configs_for_m(m, lay.rows):
                    good, err = _check_launch(lambda y: block_gemm.launch_block(x, lay, bias, y, cfg), (m, n), dt, ref)
                    if not good:
                        ok = False
                        print(f"BLOCK CHECK FAIL {n}x{k} G{g} b{bits} R{rows} {special} {dt} M={m} {cfg}: {err}",
                              flush=True)
        ws = gemm.workspace(torch.device(DEV))
        if bool(ws.partial.any()) or bool(ws.counters.any()):
            ok = False
            print("BLOCK CHECK FAIL: split-K workspace not clean after launches", flush=True)
    print("block GPU check:", "all ok" if ok else "FAILURES", flush=True)
    return ok


def block_candidates(m, rows, kinds=("wide", "pre", "table")):
    """BlockConfig candidates of the sweep for M rows and blocks of ``rows``: ``kinds`` among ``wide``
    (dequantization in the loop), ``pre`` (a dequantization pass first, M ≥ 64) and ``table`` (the
    committed configuration, an A/B in the same run)."""
    C = block_gemm.BlockConfig
    p2 = max(16, 1 << max(0, (m - 1).bit_length()))
    ab = os.environ.get("GQSA_BLOCK_AB")
    if ab:  # A/B of kernel variants at the table's configuration: asm × col_vec, or (=block_out) the y store
        base = dispatch.H200_TABLE.block.config(rows, m)
        if ab == "block_out":
            return [dataclasses.replace(base, block_out=b) for b in (True, False)]
        return [dataclasses.replace(base, asm=a, col_vec=cv) for a in (True, False) for cv in (True, False)]
    W = functools.partial(C, scale_after=False, wide=True)
    P = functools.partial(C, scale_after=False, pre=True)
    nw = 4 if rows <= 64 else 8  # one warpgroup per 64 rows (more warps replicate the dequantization)
    out = []
    if "wide" in kinds:
        if m <= 16:  # 1 or 4 warps per 64 rows (mma.sync or wgmma); more waves (split-K) to hide the gather's latency
            out += [W(block_m=16, np=npp, num_warps=w, num_stages=st, waves=wv)
                    for npp in (2, 4) for w in (nw // 4, nw) for st in (3, 4) for wv in (4.0, 8.0, 16.0)]
        elif m <= 64:  # also the fewer warps of the M ≤ 16 buckets (session 6: 1.5-1.7× faster at M = 32)
            out += [W(block_m=p2, np=npp, num_warps=w, num_stages=3, waves=wv)
                    for npp in (2, 4) for w in (max(1, nw // 4), nw // 2) for wv in (2.0, 4.0, 8.0)]
            out += [W(block_m=p2, np=npp, num_warps=nw, num_stages=st, waves=wv)
                    for npp in (2, 4) for wv in (2.0, 4.0, 8.0) for st in (3, 4)]
        elif m <= 256:
            out += [W(block_m=bm, np=npp, num_warps=nw, num_stages=st, waves=1.0)
                    for bm in (64, 128) for npp in (2, 4) for st in (3, 4)]
        else:
            out += [W(block_m=bm, np=npp, num_warps=nw, num_stages=st, split_k=1)
                    for bm in (128, 256) for npp in (2, 4) for st in (3, 4)]
    if "pre" in kinds and m >= 64:  # K = np·G per step: 64 or 128 (G = 16)
        if m <= 64:
            out += [P(block_m=64, np=npp, num_warps=nw, num_stages=st, waves=wv)
                    for npp in (4, 8) for st in (3, 4) for wv in (1.0, 2.0)]
        elif m <= 256:
            out += [P(block_m=bm, np=npp, num_warps=nw, num_stages=st, waves=1.0)
                    for bm in (64, 128) for npp in (4, 8) for st in (3, 4)]
        else:
            out += [P(block_m=bm, np=npp, num_warps=nw, num_stages=st, split_k=1)
                    for bm in (128, 256) for npp in (4, 8) for st in (3, 4)]
        if m > 64:  # the scratch's tiles by TMA (session 18: 4 warps × 5 stages won for block128)
            out += [P(block_m=bm, np=4, num_warps=w, num_stages=st, split_k=1, tma=True)
                    for bm, w in ((128, 4), (256, 8)) for st in (3, 4, 5)]
    if "table" in kinds or not out:  # the table's configuration of today (same run: an A/B)
        out.append(dispatch.H200_TABLE.block.config(rows, m))
    return out


class BlockMethod:
    """GQSA on block-uniform random layers through the block kernels with a given config function."""

    def __init__(self, n, k, sparsity, g, rows, rot, seed=0, cluster=False):
        gen = torch.Generator(device=DEV).manual_seed(seed)
        if cluster:  # the blocks' rows shuffled: clusters of R rows through the row map (--allocation clusterR)
            p0 = random_packed(n, k, sparsity, 4, g, DEV, gen, block_rows=rows, clustered=True)
        else:
            p0 = bg.random_block_packed(n, k, sparsity, g, rows, gen=gen)
        nb = p0.nbytes()
        packs = [p0] + [bg.clone_packed(p0) for _ in range(bg.n_copies(nb, rot) - 1)]
        if cluster:
            self.layouts = []
            for p in packs:
                r, row_map = detect_row_clusters(p)
                self.layouts.append(build_block_layout(p, r, row_map=row_map))
            assert self.layouts[0].rows == rows and self.layouts[0].row_map is not None
        else:
            self.layouts = [build_block_layout(p, rows) for p in packs]
        self.packs = packs
        self.packed = p0
        self.nbytes_w = nb
        self.n = n
        self.flops_per_row = 2 * n * k
        self.name = f"GQSA W4 S{round(sparsity * 100)} G{g} block{rows}"
        self.sms = gemm.num_sms(torch.device(DEV))
        self.g = g

    def fns(self, x, cfg):
        cfg = block_gemm.for_group(cfg, self.g)  # as LinearPlan runs it (the table is tuned at G16)
        y = torch.empty(x.shape[0], self.n, device=DEV, dtype=x.dtype)
        return [lambda lay=lay: block_gemm.launch_block(x, lay, None, y, cfg, self.sms) for lay in self.layouts]

    def expand_fns(self, x):
        """The per-call dense expansion + cuBLAS (``variant="dense"``): the other side of the crossover."""
        return [lambda p=p: gemv_k.gqsa_linear(x, p, None, variant="dense") for p in self.packs]


def block_sweep(args, shapes, rows_list):
    """Time the block candidates per M (W4, ``--block-sparsity``, ``--block-group``; a candidate as the plan runs it,
    ``block_gemm.for_group``); prints the best per shape and the best summed over shapes."""
    recs = []
    totals = {}
    fp16 = {}
    for n, k in shapes:
        f16 = bg.make_fp16(n, k, args.rot_bytes)
        for m in args.batches:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            fns = f16.fns_for_x(x)
            fp16[(n, k, m)] = bg.t_graph(fns, min_calls=64 if m < 256 else 8, replays=7 if m < 256 else 3)
            print(f"cuBLAS fp16 {n}x{k} M={m}: {fp16[(n, k, m)]:.2f} us", flush=True)
        del f16
        torch.cuda.empty_cache()
    for rows in rows_list:
        for n, k in shapes:
            meth = BlockMethod(n, k, args.block_sparsity, args.block_group, rows, args.rot_bytes,
                               cluster=args.block_cluster)
            for m in args.batches:
                x = torch.randn(m, k, device=DEV, dtype=torch.float16)
                ref = None
                best = None
                for cfg in block_candidates(m, rows, args.block_kinds):
                    fns = meth.fns(x, cfg)
                    try:
                        y = fns[0]()
                        torch.cuda.synchronize()
                        if ref is None:
                            ref = reference.linear(x.float(), meth.packed)
                        err = bg.rel_err(y, ref)
                        us = bg.t_graph(fns, min_calls=64 if m < 256 else 8, replays=7 if m < 256 else 3)
                    except Exception as e:  # noqa: BLE001
                        print(f"block sweep {n}x{k} R{rows} M={m} {cfg}: ERROR {repr(e)[:300]}", flush=True)
                        continue
                    recs.append({"N": n, "K": k, "M": m, "rows": rows, "cfg": cfg.__dict__, "us": us, "err": err})
                    totals.setdefault((rows, m, cfg), []).append(us)
                    if best is None or us < best[1]:
                        best = (cfg, us, err)
                if m >= 256:
                    us = bg.t_graph(meth.expand_fns(x), min_calls=8, replays=3)
                    recs.append({"N": n, "K": k, "M": m, "rows": rows, "cfg": "expand", "us": us})
                    print(f"block sweep {n}x{k} R{rows} M={m}: dense expansion + cuBLAS {us:.2f} us "
                          f"x{fp16[(n, k, m)] / us:.2f} fp16", flush=True)
                if best:
                    print(f"block sweep best {n}x{k} R{rows} M={m}: {best[1]:.2f} us x{fp16[(n, k, m)] / best[1]:.2f} "
                          f"fp16 err {best[2]:.1e} {best[0]}", flush=True)
            del meth
            torch.cuda.empty_cache()
    # the table: H200_TABLE's block buckets, the bucket that serves each swept M taking the sweep's best
    base = dispatch.H200_TABLE.block
    buckets = []
    for rows in rows_list:
        bk = [list(b) for b in base._for(base.buckets, rows)]
        for m in args.batches:
            full = [(sum(v), c) for (r, mm, c), v in totals.items() if r == rows and mm == m and len(v) == len(shapes)]
            if full and m > base.gemv_max_m:
                t, c = min(full, key=lambda t: t[0])
                print(f"block sweep table R{rows} M={m}: {t:.1f} us summed  {c}", flush=True)
                next(b for b in bk if m <= b[0] or b is bk[-1])[1] = c
        buckets.append((rows, tuple(tuple(b) for b in bk)))
    for r, bk in base.buckets:
        if r not in rows_list:
            buckets.append((r, bk))
    table = dataclasses.replace(base, buckets=tuple(sorted(buckets, key=lambda t: t[0])))
    print("block sweep table:", dispatch.table_to_json(dispatch.DispatchTable(1, block=table))["block"], flush=True)
    return recs, table


# ----------------------------------------------------------------------------- methods


class GqsaMethod:
    def __init__(self, n, k, sparsity, g, rot, path="auto", seed=0, rows=0):
        gen = torch.Generator(device=DEV).manual_seed(seed)
        p0 = bg.random_block_packed(n, k, sparsity, g, rows, gen=gen) if rows else bg.random_packed(n, k, sparsity, g,
                                                                                                      gen=gen)
        nb = p0.nbytes()
        packs = [p0] + [bg.clone_packed(p0) for _ in range(bg.n_copies(nb, rot) - 1)]
        self.plans = [dispatch.LinearPlan(p) for p in packs]
        if rows:
            assert self.plans[0].block is not None, "block layer not detected"
        self.path = path
        self.nbytes_w = nb
        self.flops_per_row = 2 * n * k
        self.name = f"GQSA W4 S{round(sparsity * 100)} G{g}" + (f" block{rows}" if rows else "") + \
            ("" if path == "auto" else f" {path}")

    def forced(self, path):
        f = GqsaMethod.__new__(GqsaMethod)
        f.__dict__.update(self.__dict__)
        f.path, f.name = path, self.name + " " + path
        return f

    def fns_for_x(self, x):
        if self.path == "auto":
            return [lambda pl=pl: pl(x) for pl in self.plans]
        if self.path == "gemv":
            return [lambda pl=pl: pl.gemv(x) for pl in self.plans]
        m, n = x.shape[0], self.plans[0].packed.shape[0]
        y = torch.empty(m, n, device=DEV, dtype=x.dtype)
        if self.path == "block":
            pl0 = self.plans[0]
            cfg = pl0.table.block.config(pl0.block.rows, m)
            return [lambda pl=pl: block_gemm.launch_block(x, pl.block, None, y, cfg, pl.sms) for pl in self.plans]
        cfg = self.plans[0].table.config(max(2, m))
        return [lambda pl=pl: gemm.launch_gemm(x, pl.layout, None, y, cfg, pl.sms) for pl in self.plans]

    def check(self, x):
        pl = self.plans[0]
        y = self.fns_for_x(x)[0]()
        return bg.rel_err(y, reference.linear(x.float(), pl.packed))


def measure(method, x, n, bw):
    fns = method.fns_for_x(x)
    fns[0]()
    torch.cuda.synchronize()
    us = bg.t_graph(fns, min_calls=64 if x.shape[0] < 256 else 8, replays=15 if x.shape[0] < 256 else 5)
    nbytes = method.nbytes_w + x.nbytes + x.shape[0] * n * 2
    rec = {"method": method.name, "M": x.shape[0], "us": us, "bytes": nbytes, "tbps": nbytes / (us * 1e-6) / 1e12,
           "roof_pct": 100 * nbytes / (bw * 1e12) / (us * 1e-6),
           "tflops": method.flops_per_row * x.shape[0] / (us * 1e-6) / 1e12}
    if hasattr(method, "check") and callable(method.check) and isinstance(method, GqsaMethod):
        rec["rel_err"] = method.check(x)
    return rec


def run_matrix(args, bw, records):
    shapes = [(m, s) for m in args.models.split(",") for s in bg.MODELS[m]]
    for model, (n, k) in shapes:
        t0 = time.time()
        methods = [bg.make_fp16(n, k, args.rot_bytes), bg.make_tinygemm(n, k, 128, args.rot_bytes)]
        block_rows = [int(r) for r in (args.matrix_rows or args.block_rows).split(",") if r]
        for sp in (0.5,) if args.quick else (0.5, 0.3):
            methods.append(GqsaMethod(n, k, sp, 16, args.rot_bytes))
            for r in block_rows if sp == 0.5 else block_rows[-1:]:
                methods.append(GqsaMethod(n, k, sp, 16, args.rot_bytes, rows=r))
        small = [methods[2].forced("gemv"), methods[2].forced("gemm")]
        small_block = [m.forced("block") for m in methods[3:3 + len(block_rows)]]
        base = {}
        for m in args.batches:
            x16 = torch.randn(m, k, device=DEV, dtype=torch.float16)
            for meth in methods + (small if m <= 4 else []) + (small_block if m <= 2 else []):
                if m >= 256 and meth.name.startswith("tinygemm"):
                    continue  # a decode kernel (~29 TFLOP/s at any M): seconds per graph here
                try:
                    r = measure(meth, x16, n, bw)
                except Exception as e:  # noqa: BLE001
                    r = {"method": meth.name, "M": m, "error": repr(e)[:300]}
                    traceback.print_exc()
                r.update(model=model, N=n, K=k)
                if meth.name == "cuBLAS fp16":
                    base[m] = r.get("us")
                if base.get(m) and r.get("us"):
                    r["x_fp16"] = base[m] / r["us"]
                records.append(r)
                print(fmt_row(r), flush=True)
        del methods, small, small_block
        torch.cuda.empty_cache()
        print(f"# {model} {n}x{k}: {time.time() - t0:.0f}s", flush=True)
        if args.out:
            (Path(args.out) / "gemm.json").write_text(json.dumps({"records": records}, indent=1))


def fmt_row(r):
    if "error" in r:
        return f"{r.get('model', '')} {r.get('N')}x{r.get('K')} M={r['M']} {r['method']}: ERROR {r['error']}"
    return (f"{r.get('model', '')} {r['N']}x{r['K']} M={r['M']:5d} {r['method']:<26s} {r['us']:9.2f} us "
            f"{r['tbps']:5.2f} TB/s {r['roof_pct']:5.1f}% {r['tflops']:7.1f} TF  x{r.get('x_fp16', 0):5.2f}"
            + (f" err {r['rel_err']:.1e}" if "rel_err" in r else ""))


def markdown(records, meta) -> str:
    lines = [f"{k}: {v}" for k, v in meta.items()] + [""]
    lines.append("| model | N×K | M | method | µs | TB/s | % roofline | TFLOP/s | × fp16 |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['N']}×{r['K']} | {r['M']} | {r['method']} | error | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['N']}×{r['K']} | {r['M']} | {r['method']} | {r['us']:.2f} | "
                     f"{r['tbps']:.2f} | {r['roof_pct']:.0f} | {r['tflops']:.1f} | {r.get('x_fp16', 0):.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- sweep


def candidates(m):
    """GemmConfig candidates of the sweep at ``m`` rows (BLOCK_N is the tensor cores' M side: 64 or 128; one
    stage: Triton's pipeliner lost to the kernel's own at every M and shape of the first sweep). The first of each
    list up to M = 256 is the committed table's bucket (``dispatch.H200_TABLE``); ``halves`` (two column sets per k-tile) with the register limits under
    which ``benchmarks/gemm_sass.py`` shows no spill: 128 at 16×128 and 32×128 tiles, 168 at 64×128 (3 programs of 4
    warps per SM instead of 2)."""
    C = functools.partial(gemm.GemmConfig, num_warps=4, num_stages=1)
    if m <= 16:
        return [C(16, 128, waves=2.0, prefetch=True, maxnreg=128), C(16, 128, waves=4.0, prefetch=True, maxnreg=128),
                C(16, 128, waves=2.0, prefetch=True, halves=True), C(16, 128, waves=2.0, prefetch=True, maxnreg=128,
                                                                      halves=True),
                C(16, 128, waves=4.0, prefetch=True, maxnreg=128, halves=True),
                C(16, 64, waves=2.0, prefetch=True, halves=True), C(16, 64, waves=4.0, prefetch=True, halves=True)]
    if m <= 32:
        return [C(32, 128, waves=2.0, prefetch=True, maxnreg=128, halves=True), C(32, 64, waves=2.0, prefetch=True),
                C(32, 64, waves=2.0, prefetch=True, halves=True), C(32, 64, waves=1.0, prefetch=True, halves=True),
                C(32, 128, waves=1.0, prefetch=True, maxnreg=128, halves=True)]
    if m <= 64:
        return [C(64, 128, waves=1.0), C(64, 128, waves=1.0, maxnreg=168, halves=True),
                C(64, 128, waves=2.0, maxnreg=168, halves=True), C(64, 128, waves=1.0, prefetch=True, maxnreg=168,
                                                                  halves=True),
                C(64, 64, waves=1.0, halves=True), C(64, 64, waves=2.0, halves=True),
                C(64, 128, num_warps=8, waves=1.0, halves=True)]
    if m <= 256:
        return [C(128, 128, waves=1.0, halves=True), C(128, 128, waves=1.0), C(128, 128, num_warps=8, waves=1.0),
                C(128, 128, num_warps=8, waves=1.0, halves=True), C(64, 128, waves=1.0, maxnreg=168, halves=True)]
    return [C(128, bn, num_warps=8, split_k=1, prefetch=pf) for bn in (128, 256) for pf in (False, True)]


def sweep(args, records, path=None):
    """Time the candidates per M on three shapes; the table takes, per M, the candidate with the least
    total time over the shapes; ``gemv_max_m``: the largest swept M ≤ ``gemv.V2_MAX_BATCH`` up to which the GEMV
    beat the GEMM at every swept M (summed over the shapes; sweep M = 3 to decide it there); ``expand_min_m``: the smallest swept M ≥ 128 from which the
    per-call dense expansion + cuBLAS beat the best candidate at every larger swept M (None: it never did; the
    default table's when no M ≥ 128 was swept). The block-layer table stays the default's."""
    shapes = [(4096, 4096), (11008, 4096), (28672, 8192)]
    ms = [b for b in args.batches if b > 1]
    totals = {}  # (m, cfg) -> [us per shape]
    gemv_us = {}  # m -> [GEMV us per shape], m ≤ V2_MAX_BATCH
    expand_us = {}  # m -> [expansion + cuBLAS us per shape], m ≥ 128
    for n, k in shapes:
        meth = GqsaMethod(n, k, 0.5, 16, args.rot_bytes)
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            y = torch.empty(m, n, device=DEV, dtype=torch.float16)
            if m <= gemv_k.V2_MAX_BATCH:
                fns = [lambda pl=pl: pl.gemv(x) for pl in meth.plans]
                fns[0]()
                gemv_us.setdefault(m, []).append(bg.t_graph(fns, replays=7))
            if m >= 128:
                fns = [lambda pl=pl: gemv_k.gqsa_linear(x, pl.packed, None, variant="dense") for pl in meth.plans]
                fns[0]()
                expand_us.setdefault(m, []).append(bg.t_graph(fns, min_calls=8, replays=3))
            best = None
            for cfg in candidates(m):
                fns = [lambda pl=pl, cfg=cfg: gemm.launch_gemm(x, pl.layout, None, y, cfg, pl.sms) for pl in meth.plans]
                try:
                    fns[0]()
                    torch.cuda.synchronize()
                    us = bg.t_graph(fns, min_calls=64 if m < 256 else 8, replays=7 if m < 256 else 3)
                except Exception as e:  # noqa: BLE001
                    print(f"sweep {n}x{k} M={m} {cfg}: ERROR {repr(e)[:200]}", flush=True)
                    continue
                records.append({"N": n, "K": k, "M": m, "cfg": cfg.__dict__, "us": us})
                totals.setdefault((m, cfg), []).append(us)
                if best is None or us < best[1]:
                    best = (cfg, us)
            print(f"sweep best {n}x{k} M={m}: {best}", flush=True)
        del meth
        torch.cuda.empty_cache()
    buckets = []
    for m in ms:
        full = [(sum(v), c) for (mm, c), v in totals.items() if mm == m and len(v) == len(shapes)]
        if full:
            buckets.append((m if m != ms[-1] else 1 << 62, min(full, key=lambda t: t[0])[1]))
    gemv_max_m, won = 1, True  # the GEMV up to the largest swept M before its first loss (unswept Ms between
    for m in sorted(gemv_us):   # two wins count as won: M = 2 and 4 won give 4)
        gv = sum(gemv_us[m])
        gm = min((sum(v) for (mm, c), v in totals.items() if mm == m and len(v) == len(shapes)), default=float("inf"))
        print(f"sweep: GEMV at M={m} {gv:.1f} us vs GEMM {gm:.1f} us (sum of 3 shapes)", flush=True)
        won = won and gv < gm
        if won:
            gemv_max_m = m
    expand_min_m = None if expand_us else dispatch.default_table().expand_min_m  # nothing swept ≥ 128: as it was
    for m in sorted(expand_us, reverse=True):
        ex = sum(expand_us[m])
        gm = min((sum(v) for (mm, c), v in totals.items() if mm == m and len(v) == len(shapes)), default=float("inf"))
        print(f"sweep: expansion + cuBLAS at M={m} {ex:.1f} us vs GEMM {gm:.1f} us (sum of 3 shapes)", flush=True)
        if ex >= gm:
            break
        expand_min_m = m
    table = dataclasses.replace(dispatch.default_table(), gemv_max_m=gemv_max_m, buckets=tuple(buckets),
                                expand_min_m=expand_min_m)
    print("sweep table:", dispatch.table_to_json(table), flush=True)
    if path is not None:
        path.write_text(json.dumps({"records": records}, indent=1))
        (path.parent / "gemm_table.json").write_text(json.dumps(dispatch.table_to_json(table), indent=1))
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="GPU correctness of the dispatch paths")
    ap.add_argument("--sweep", action="store_true", help="GemmConfig candidates per M on three shapes")
    ap.add_argument("--block-check", action="store_true", help="GPU correctness of the block kernels")
    ap.add_argument("--block-sweep", action="store_true", help="BlockConfig candidates per M (block16/64)")
    ap.add_argument("--block-rows", default="16,64", help="block heights of the sweep and the matrix")
    ap.add_argument("--block-cluster", action="store_true",
                    help="block sweep on clusters of R shuffled rows (the row map of --allocation clusterR)")
    ap.add_argument("--block-sparsity", type=float, default=0.5, help="sparsity of the block sweep's layers")
    ap.add_argument("--block-group", type=int, default=16, help="group size of the block sweep's layers")
    ap.add_argument("--block-kinds", default="wide,pre,table",
                    help="kernel kinds of the block sweep's candidates: wide, pre, table (comma-separated)")
    ap.add_argument("--sweep-batches", default="", help="M of the sweeps (default: --batches)")
    ap.add_argument("--matrix-rows", default="", help="block heights of the matrix (default: --block-rows)")
    ap.add_argument("--matrix", action="store_true", help="the side-by-side matrix (default when nothing else)")
    ap.add_argument("--quick", action="store_true", help="fp16, tinygemm and GQSA S50 only")
    ap.add_argument("--use-sweep", action="store_true", help="the matrix runs with the table the sweep found")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default=",".join(bg.MODELS))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--rot-bytes", type=int, default=160 << 20)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.block_kinds = tuple(args.block_kinds.split(","))
    args.matrix_batches = args.batches
    if args.sweep_batches:
        args.batches = [int(b) for b in args.sweep_batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    p = torch.cuda.get_device_properties(0)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": p.name, "sms": p.multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv)}
    print(meta, flush=True)
    if args.check:
        meta["check_ok"] = gpu_check(quick=args.quick)
    if args.block_check:
        tb = dispatch.default_table().block
        pre = block_gemm.BlockConfig(block_m=64, np=4, scale_after=False, pre=True)
        pre_tma = dataclasses.replace(pre, tma=True, pre_tiles=2)  # the scratch by TMA, its zeroed tails
        meta["block_check_ok"] = block_check(lambda m, r: block_candidates(m, r)[:1] + [tb.config(r, m), pre, pre_tma],
                                             quick=args.quick)
    if args.block_sweep:
        shapes = [(4096, 4096), (11008, 4096), (28672, 8192)]
        recs, btable = block_sweep(args, shapes, [int(r) for r in args.block_rows.split(",")])
        (out / "block_sweep.json").write_text(json.dumps({"meta": meta, "records": recs}, indent=1))
        if args.use_sweep:
            full = dataclasses.replace(dispatch.default_table(), block=btable)
            (out / "gemm_table.json").write_text(json.dumps(dispatch.table_to_json(full), indent=1))
            os.environ["GQSA_DISPATCH_TABLE"] = str(out / "gemm_table.json")
    if args.sweep:
        table = sweep(args, [], out / "gemm_sweep.json")
        if args.use_sweep:
            os.environ["GQSA_DISPATCH_TABLE"] = str(out / "gemm_table.json")
            meta["table"] = dispatch.table_to_json(table)
    meta["table_used"] = dispatch.table_to_json(dispatch.default_table())
    if args.block_sweep and args.batches != args.matrix_batches:
        args.batches = args.matrix_batches
    if args.matrix or not (args.check or args.sweep or args.block_check or args.block_sweep):
        bw = bg.copy_bandwidth(10, 40)
        meta["copy_tbps"] = round(bw, 3)
        print(f"copy bandwidth {bw:.3f} TB/s", flush=True)
        recs = []
        try:
            run_matrix(args, bw, recs)
        finally:
            (out / "gemm.json").write_text(json.dumps({"meta": meta, "records": recs}, indent=1))
            (out / "gemm.md").write_text(markdown(recs, meta))
    return 0 if meta.get("check_ok", True) and meta.get("block_check_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
