#!/usr/bin/env python
"""GQSA decode-kernel benchmark (issue 4): µs, effective TB/s, % of roofline, speed-up over fp16.

Runs on one CUDA GPU. For the linear shapes of LLaMA-2-7B, LLaMA-3-8B and LLaMA-2-70B it times,
side by side: cuBLAS fp16 (``F.linear``), torch's int4 tinygemm (``_weight_int4pack_mm``, g128 and
g32, bf16 activations as that kernel requires), torch 2:4 semi-structured sparse fp16 (where it
runs) and the GQSA kernels (W4, sparsity S, group G, task- and data-centric), each on weights
rotated over more than the 50 MB L2 (``--rot-bytes``), median of ``triton.testing.do_bench`` (which
also zeroes a 256 MB buffer before every call). ``--graph`` adds CUDA-graph replay timings of the
headline methods (a graph of back-to-back calls over the rotated copies; µs per call), the setting
of a decode engine that replays graphs. Every GQSA result is checked against
``gqsa.kernels.reference.linear`` (relative error < 1e-2).

Roofline: the fewest bytes a method must move (its weight format, read once, plus x and y) over the
device-to-device copy bandwidth measured in the same run (bytes read + written).

    python benchmarks/gemv.py --out DIR            # full matrix (fits in one 10-minute device call)
    python benchmarks/gemv.py --quick --out DIR    # 2 shapes, batch 1, headline methods
    python benchmarks/gemv.py --check              # GPU correctness matrix of every kernel variant
    python benchmarks/gemv.py --sweep --out DIR    # tuning knobs on the quick shapes
    python benchmarks/gemv.py --v2 --out DIR       # issue 12: GPU check of the v2 kernel, then v1 vs v2
                                                   # (and v2 settings) at batch 1, every shape, graph timing
    python benchmarks/gemv.py --v2-batch --out DIR # the v2 kernel at M = 2-4 rows of x: GPU check, then cuBLAS
                                                   # fp16, the old path (v1 / GEMM) and batched v2, M = 1-4
    python benchmarks/gemv.py --half-batch --out DIR  # the packed-fp16 dot at M = 1-4 on W4 S0 G128 / S30 G64
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gqsa.format import PackedLinear  # noqa: E402
from gqsa.kernels import gemv, jit, reference  # noqa: E402

MODELS = {
    "LLaMA-2-7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "LLaMA-3-8B": [(1024, 4096), (14336, 4096), (4096, 14336)],
    "LLaMA-2-70B": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}
DEV = "cuda"


# ----------------------------------------------------------------------------- inputs


def random_packed(n, k, sparsity, g, bits=4, float_zeros=False, gen=None, device=DEV) -> PackedLinear:
    """A packed layer with balanced group sparsity (the same number of kept groups in every row)
    and random codes, scales and zero points. Only K % G == 0 (every benchmarked shape)."""
    assert k % g == 0
    c = k // g
    keep = max(1, round((1 - sparsity) * c))
    cols = torch.rand(n, c, device=device, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values
    nnz = n * keep
    row_ptr = (torch.arange(n + 1, device=device, dtype=torch.int64) * keep).to(torch.int32)
    qweight = torch.randint(0, 256, (nnz, g * bits // 8), device=device, dtype=torch.uint8, generator=gen)
    scales = (torch.rand(nnz, device=device, generator=gen) * 0.02 + 0.002).half()
    if float_zeros:
        zeros = (torch.rand(nnz, device=device, generator=gen) * (2**bits - 1)).half()
    else:
        zeros = torch.randint(0, 2**bits, (nnz,), device=device, dtype=torch.uint8, generator=gen)
    return PackedLinear(row_ptr=row_ptr, col_idx=cols.reshape(-1).to(torch.int16).contiguous(), qweight=qweight,
                        scales=scales, zeros=zeros, shape=(n, k), bits=bits, group_size=g)


def random_block_packed(n, k, sparsity, g, rows, bits=4, float_zeros=False, gen=None, device=DEV) -> PackedLinear:
    """Like :func:`random_packed`, block-uniform: every ``rows`` consecutive rows keep the same group
    columns (the pattern of ``--allocation blockR``)."""
    assert k % g == 0
    c = k // g
    keep = max(1, round((1 - sparsity) * c))
    nb = -(-n // rows)
    bcols = torch.rand(nb, c, device=device, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values
    cols = bcols.repeat_interleave(rows, dim=0)[:n]
    p = random_packed(n, k, sparsity, g, bits, float_zeros, gen, device)
    return PackedLinear(row_ptr=p.row_ptr, col_idx=cols.reshape(-1).to(torch.int16).contiguous(), qweight=p.qweight,
                        scales=p.scales, zeros=p.zeros, shape=(n, k), bits=bits, group_size=g)


def clone_packed(p: PackedLinear) -> PackedLinear:
    return PackedLinear(**{k: v.clone() for k, v in p.tensors().items()}, shape=p.shape, bits=p.bits,
                        group_size=p.group_size)


def n_copies(nbytes: int, rot_bytes: int) -> int:
    return max(2, min(256, math.ceil(rot_bytes / max(1, nbytes))))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- timing


def t_do_bench(fns, warmup, rep) -> float:
    """Median µs of one call, cycling through ``fns`` (one per weight copy)."""
    import triton

    it = itertools.cycle(fns)
    return 1e3 * triton.testing.do_bench(lambda: next(it)(), warmup=warmup, rep=rep, return_mode="median")


def t_graph(fns, min_calls=64, replays=15) -> float:
    """µs per call from CUDA-graph replays of back-to-back calls over the rotated copies."""
    calls = list(itertools.islice(itertools.cycle(fns), max(min_calls, len(fns))))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del g
    return statistics.median(times)


def copy_bandwidth(warmup, rep) -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    import triton

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    a.random_(0, 255)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=warmup, rep=rep, return_mode="median")
    del a, b
    return 2 * n / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- methods


class Method:
    """One way of computing y = x Wᵀ for a shape: holds rotated weight copies and its byte count."""

    def __init__(self, name, fns_for_x, nbytes_w, flops_per_row, check=None):
        self.name, self.fns_for_x, self.nbytes_w, self.flops_per_row, self.check = (
            name, fns_for_x, nbytes_w, flops_per_row, check)


def make_fp16(n, k, rot):
    w0 = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
    ws = [w0] + [w0.clone() for _ in range(n_copies(w0.nbytes, rot) - 1)]
    return Method("cuBLAS fp16", lambda x: [lambda w=w: F.linear(x, w) for w in ws], w0.nbytes, 2 * n * k)


def make_tinygemm(n, k, gs, rot, verify=False):
    """torch's int4 tinygemm: weight [N, K/2] uint8 (even element in the high nibble), packed by
    ``_convert_weight_to_int4pack(w, innerKTiles=8)``; scales_and_zeros [K/gs, N, 2] bf16 with
    w = (q − 8)·scale + zero; bf16 activations."""
    q = torch.randint(0, 16, (n, k), device=DEV, dtype=torch.int32)
    w_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(w_u8, 8)
    scales = torch.rand(k // gs, n, device=DEV) * 0.02 + 0.002
    zeros = torch.randn(k // gs, n, device=DEV) * 0.01
    sz = torch.stack([scales, zeros], dim=2).to(torch.bfloat16).contiguous()
    err = None
    if verify:
        x = torch.randn(3, k, device=DEV, dtype=torch.bfloat16)
        deq = ((q.float() - 8).reshape(n, k // gs, gs) * sz[..., 0].float().t()[..., None]
               + sz[..., 1].float().t()[..., None]).reshape(n, k)
        err = rel_err(torch.ops.aten._weight_int4pack_mm(x, packed, gs, sz), x.float() @ deq.t())
    nb = packed.nbytes + sz.nbytes
    copies = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n_copies(nb, rot) - 1)]
    m = Method(f"tinygemm int4 g{gs}",
               lambda x: [lambda p=p, s=s, xb=x.to(torch.bfloat16): torch.ops.aten._weight_int4pack_mm(xb, p, gs, s)
                          for p, s in copies], nb, 2 * n * k)
    m.verify_err = err
    return m


def make_semi24(n, k, rot):
    from torch.sparse import to_sparse_semi_structured

    w = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
    mask = torch.tensor([1, 1, 0, 0], device=DEV, dtype=torch.bool).repeat(n, k // 4)
    ws0 = to_sparse_semi_structured(w * mask)
    nb = sum(t.nbytes for t in (getattr(ws0, a, None) for a in ("packed", "meta")) if isinstance(t, torch.Tensor))
    nb = nb or n * k  # values (half of fp16) + metadata, if the attributes are not exposed
    copies = [ws0] + [to_sparse_semi_structured(w * mask) for _ in range(min(3, n_copies(nb, rot) - 1))]
    return Method("torch 2:4 fp16", lambda x: [lambda s=s: F.linear(x, s) for s in copies], nb, n * k)


def make_gqsa(n, k, sparsity, g, rot, variant, packs=None, tab=None):
    """GQSA through ``GemvPlan`` (what ``GQSALinear`` holds): one plan per weight copy, one shared
    task table. ``variant="dense"``: the prefill path (Triton expansion + cuBLAS) for comparison."""
    if variant == "dense":
        fns_for_x = lambda x: [lambda p=p: gemv.gqsa_linear(x, p, variant="dense") for p in packs]  # noqa: E731
        check = lambda x: rel_err(gemv.gqsa_linear(x, packs[0], variant="dense"),  # noqa: E731
                                  reference.linear(x, packs[0]).float())
    else:
        plans = [gemv.prepare(p, variant=variant, tasks=tab if variant == "task" else None) for p in packs]
        fns_for_x = lambda x: [lambda pl=pl: pl(x) for pl in plans]  # noqa: E731
        check = lambda x: rel_err(plans[0](x), reference.linear(x, packs[0]).float())  # noqa: E731
    return Method(f"GQSA W4 S{round(sparsity * 100)} G{g} {variant}", fns_for_x, packs[0].nbytes(),
                  2 * packs[0].nnz * g, check=check)


# ----------------------------------------------------------------------------- runs


def measure(method: Method, x, n, bw, args, graph=False):
    fns = method.fns_for_x(x)
    fns[0]()  # compile / warm
    torch.cuda.synchronize()
    rec = {"method": method.name, "B": x.shape[0]}
    us = t_do_bench(fns, args.warmup, args.rep)
    nbytes = method.nbytes_w + x.nbytes + x.shape[0] * n * 2
    rec.update(us=us, bytes=nbytes, tbps=nbytes / (us * 1e-6) / 1e12, roof_us=nbytes / (bw * 1e12) * 1e6)
    rec["roof_pct"] = 100 * rec["roof_us"] / us
    rec["tflops"] = method.flops_per_row * x.shape[0] / (us * 1e-6) / 1e12
    if graph:
        rec["graph_us"] = t_graph(fns)
        rec["graph_roof_pct"] = 100 * rec["roof_us"] / rec["graph_us"]
    if method.check is not None:
        rec["rel_err"] = method.check(x)
        rec["ok"] = bool(rec["rel_err"] < 1e-2)
    return rec


def run_matrix(args, shapes, batches_full, batches_small, sparsities, groups, bw, out_records):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    tg_checked = False
    for model, n, k in shapes:
        t_shape = time.time()
        fp16 = make_fp16(n, k, args.rot_bytes)
        base = [fp16]
        try:
            tg = make_tinygemm(n, k, 128, args.rot_bytes, verify=not tg_checked)
            if not tg_checked:
                print(f"[tinygemm call check] rel err vs dequantized reference: {tg.verify_err:.2e}", flush=True)
                tg_checked = True
            base.append(tg)
            if not args.quick:
                base.append(make_tinygemm(n, k, 32, args.rot_bytes))
        except Exception as e:  # noqa: BLE001
            print(f"tinygemm unavailable: {type(e).__name__}: {e}", flush=True)
        semi = None
        if args.semi and not args.quick:
            try:
                semi = make_semi24(n, k, args.rot_bytes)
            except Exception as e:  # noqa: BLE001
                print(f"2:4 unavailable at {n}x{k}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        gq = []
        for s in sparsities:
            for g in groups:
                p0 = random_packed(n, k, s, g, gen=gen)
                packs = [p0] + [clone_packed(p0) for _ in range(n_copies(p0.nbytes(), args.rot_bytes) - 1)]
                tab = gemv.build_task_table(p0)
                headline = s == 0.5 and g == 16
                full_batches = headline or (s == 0.5 and g == 128) or (s == 0.7 and g == 16)
                for variant in ("task", "data") + (("dense",) if headline and not args.quick else ()):
                    gq.append((make_gqsa(n, k, s, g, args.rot_bytes, variant, packs, tab), full_batches, headline))
        for b in sorted(set(batches_full) | set(batches_small)):
            x = torch.randn(b, k, device=DEV, dtype=torch.float16)
            recs = []
            for m in base:
                if b in batches_full or m.name in ("cuBLAS fp16", "tinygemm int4 g128"):
                    recs.append(measure(m, x, n, bw, args, graph=args.graph))
            if semi is not None and b == 1:
                try:
                    recs.append(measure(semi, x, n, bw, args))
                except Exception as e:  # noqa: BLE001
                    print(f"2:4 failed at {n}x{k} B={b}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    semi = None
            for m, full, headline in gq:
                if b in batches_full or full:
                    recs.append(measure(m, x, n, bw, args, graph=args.graph and not m.name.endswith("dense")))
            fp = next(r["us"] for r in recs if r["method"] == "cuBLAS fp16")
            fpg = next((r.get("graph_us") for r in recs if r["method"] == "cuBLAS fp16"), None)
            for r in recs:
                r.update(model=model, N=n, K=k, speedup_fp16=fp / r["us"])
                if fpg and r.get("graph_us"):
                    r["graph_speedup_fp16"] = fpg / r["graph_us"]
                tg = next((q for q in recs if q["method"] == "tinygemm int4 g128"), None)
                if tg:
                    r["speedup_tg128"] = tg["us"] / r["us"]
                    if tg.get("graph_us") and r.get("graph_us"):
                        r["graph_speedup_tg128"] = tg["graph_us"] / r["graph_us"]
                out_records.append(r)
                print(fmt_row(r), flush=True)
        del fp16, base, gq, semi
        torch.cuda.empty_cache()
        print(f"  [{model} {n}x{k} done in {time.time() - t_shape:.1f}s]", flush=True)


def cpu_overhead(n=4096, k=4096):
    """Host cost of one call (µs): a tight loop of calls on a small layer, synchronized at the end."""
    p = random_packed(n, k, 0.5, 16)
    x = torch.randn(1, k, device=DEV, dtype=torch.float16)
    tab = gemv.build_task_table(p)
    plan = gemv.prepare(p, tasks=tab)
    out = {}
    for name, f in (("gqsa_linear(task)", lambda: gemv.gqsa_linear(x, p, tasks=tab)),
                    ("gqsa_linear(data)", lambda: gemv.gqsa_linear(x, p, variant="data")),
                    ("GemvPlan(task)", lambda: plan(x)), ("F.linear fp16 4096x4096", None)):
        if f is None:
            w = torch.randn(n, k, device=DEV, dtype=torch.float16)
            f = lambda: F.linear(x, w)  # noqa: E731
        for _ in range(50):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            f()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t) / 2000 * 1e6
        print(f"  per-call wall time, back-to-back: {name:26s} {out[name]:7.2f} us", flush=True)
    return out


def apply_tuning(path) -> dict:
    """Pick, per variant, the sweep setting with the best geometric-mean % of roofline (do_bench and
    graph averaged) over the swept shapes and groups, and make it the kernels' default."""
    recs = [r for r in json.loads(Path(path).read_text())["records"] if r["asm"] and r["rel_err"] < 1e-2]
    best = {}
    for variant in ("task", "data"):
        score = {}
        for r in recs:
            if r["variant"] != variant:
                continue
            key = (r["unit_codes"], r["num_warps"], r["units_per_thread"], r["tasks_per_sm"])
            score.setdefault(key, []).append(math.log(0.5 * (r["roof_pct"] + r["graph_roof_pct"])))
        n_cases = max(len(v) for v in score.values())
        key = max((k for k, v in score.items() if len(v) == n_cases), key=lambda k: sum(score[k]))
        best[variant] = dict(zip(("unit_codes", "num_warps", "units_per_thread", "tasks_per_sm"), key),
                             geomean_pct=math.exp(sum(score[key]) / n_cases))
    t, d = best["task"], best["data"]
    # one unit size for both (the code-word view is shared): the task-centric winner's
    gemv.UNIT_CODES = t["unit_codes"]
    gemv.TASK_DEFAULTS.update(tasks_per_sm=t["tasks_per_sm"], num_warps=t["num_warps"],
                              units_per_thread=t["units_per_thread"])
    dd = max((r for r in recs if r["variant"] == "data" and r["unit_codes"] == t["unit_codes"]),
             key=lambda r: 0.5 * (r["roof_pct"] + r["graph_roof_pct"]), default=None)
    if d["unit_codes"] != t["unit_codes"] and dd is not None:
        d = dict(unit_codes=dd["unit_codes"], num_warps=dd["num_warps"], units_per_thread=dd["units_per_thread"])
    gemv.DATA_NUM_WARPS = d["num_warps"]
    gemv.DATA_UNITS_PER_THREAD = d["units_per_thread"]
    return best


def fmt_row(r):
    g = f" graph {r['graph_us']:8.2f}us {r['graph_roof_pct']:5.1f}%" if "graph_us" in r else ""
    ok = "" if "ok" in r else ""
    if "ok" in r:
        ok = f" err {r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'}"
    return (f"{r.get('model', ''):11s} {r.get('N', 0):6d}x{r.get('K', 0):<6d} B={r['B']:<2d} {r['method']:26s} "
            f"{r['us']:9.2f}us {r['tbps']:5.2f}TB/s {r['roof_pct']:5.1f}% x{r.get('speedup_fp16', 0):5.2f}{g}{ok}")


def markdown(records, meta) -> str:
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}; triton {meta['triton']}; copy bandwidth "
             f"{meta['copy_tbps']:.3f} TB/s (read+write); timing: median of triton.testing.do_bench "
             f"(warmup {meta['warmup']} ms, rep {meta['rep']} ms), weights rotated over ≥ {meta['rot_mb']} MB.",
             "",
             "| model | N×K | B | method | µs | TB/s | % roofline | × fp16 | × tg128 | graph µs | graph % roof | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['N']}×{r['K']} | {r['B']} | {r['method']} | {r['us']:.2f} | {r['tbps']:.2f} | "
            f"{r['roof_pct']:.1f} | {r.get('speedup_fp16', float('nan')):.2f} | {r.get('speedup_tg128', float('nan')):.2f} | "
            f"{r['graph_us']:.2f} | {r['graph_roof_pct']:.1f} |" if "graph_us" in r else
            f"| {r['model']} | {r['N']}×{r['K']} | {r['B']} | {r['method']} | {r['us']:.2f} | {r['tbps']:.2f} | "
            f"{r['roof_pct']:.1f} | {r.get('speedup_fp16', float('nan')):.2f} | {r.get('speedup_tg128', float('nan')):.2f} | | |"
        )
        lines[-1] += f" {r['rel_err']:.1e} |" if "rel_err" in r else " |"
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- GPU correctness


def packed_case(n, k, g, bits, sp, fz=False, special=None):
    """A random packed layer for the GPU checks (``special``: empty_rows, one_row, empty)."""
    from gqsa import format as fmt
    from gqsa import quant

    c = math.ceil(k / g)
    w = torch.randn(n, c, g)
    s, z = quant.minmax_params(w, bits)
    if fz:
        z = z + torch.rand_like(z) * 0.8 - 0.4
    q = quant.quantize(w, s, z, bits)
    mask = torch.rand(n, c) > sp
    if special == "empty_rows":
        mask[::3] = False
    elif special == "one_row":
        mask[:] = False
        mask[n // 2] = True
    elif special == "empty":
        mask[:] = False
    return fmt.pack(q, s, z, mask, (n, k), bits, g, float_zeros=fz).to(DEV)


def gpu_check() -> bool:
    """Every kernel variant against the reference on random layers (GPU), asm and plain paths."""

    torch.manual_seed(0)
    fails, n_run = [], 0
    unit_codes_default = gemv.UNIT_CODES

    # (layer case, activation dtype, batch, variant, asm); compiled variants are kept few on purpose
    runs = []
    f16, b16 = torch.float16, torch.bfloat16
    for g in (16, 32, 64, 128):  # 16-code units on the fast and the plain path
        cs = dict(n=97, k=1000 if g <= 64 else 1100, g=g, bits=4, sp=0.5, fz=False)
        runs += [(cs, f16, 1, "task", True, 16), (cs, b16, 16, "task", True, 16), (cs, f16, 1, "data", True, 16),
                 (cs, b16, 3, "data", True, 16), (cs, f16, 2, "task", False, 16)]
        cs = dict(n=97, k=1000 if g <= 64 else 1100, g=g, bits=2, sp=0.5, fz=True)
        runs += [(cs, f16, 1, "task", True, 16)]
    for g in (16, 32, 64, 128):  # the fast path: 4-bit, integer zeros, inline PTX
        cs = dict(n=97, k=1000 if g <= 64 else 1100, g=g, bits=4, sp=0.5, fz=False)
        runs += [(cs, f16, 1, "task", True), (cs, f16, 3, "task", True), (cs, b16, 16, "task", True),
                 (cs, f16, 16, "data", True), (cs, f16, 1, "data", True), (cs, b16, 3, "data", True),
                 (cs, f16, 1, "task", False), (cs, b16, 5, "data", False), (cs, f16, 40, "auto", True)]
    for bits, g, fz in itertools.product((2, 4, 8), (16, 128), (False, True)):  # the plain path
        if bits == 4 and not fz:
            continue
        cs = dict(n=97, k=1000 if g <= 64 else 1100, g=g, bits=bits, sp=0.5, fz=fz)
        runs += [(cs, f16, 1, "task", True), (cs, b16, 3, "data", True)]
    for special in ("empty_rows", "one_row", "empty"):
        cs = dict(n=61, k=4096 + 40, g=16, bits=4, sp=0.4, fz=False, special=special)
        runs += [(cs, f16, 1, "task", True), (cs, f16, 1, "data", True), (cs, b16, 3, "task", True)]
    big = dict(n=3000, k=4096, g=16, bits=4, sp=0.5, fz=False)
    runs += [(big, f16, 1, "task", True), (big, f16, 16, "task", True), (big, f16, 1, "data", True)]
    bigf = dict(n=512, k=8192, g=128, bits=4, sp=0.3, fz=True)
    runs += [(bigf, f16, 1, "task", True), (bigf, b16, 3, "data", True)]
    cache = {}
    for run in runs:
        cs, dt, b, variant, asm = run[:5]
        gemv.UNIT_CODES = run[5] if len(run) > 5 else 8
        key = tuple(sorted(cs.items()))
        if key not in cache:
            cache[key] = packed_case(cs["n"], cs["k"], cs["g"], cs["bits"], cs["sp"], cs["fz"], cs.get("special"))
        p = cache[key]
        bias = torch.randn(cs["n"], device=DEV, dtype=torch.float16)
        gemv._ASM_ENABLED = asm
        for tps in ((1, 4) if variant == "task" else (None,)):
            tab = gemv.build_task_table(p, tasks_per_sm=tps) if variant == "task" else None
            for rep in range(2):  # twice: the merge workspace must come back clean
                x = torch.randn(b, cs["k"], device=DEV, dtype=dt)
                y = gemv.gqsa_linear(x, p, bias, tasks=tab, variant=variant)
                ref = reference.linear(x.float(), p, bias.float())
                e = rel_err(y, ref)
                n_run += 1
                tol = 1e-2 if dt == torch.bfloat16 else 2e-3
                if not (e < tol):
                    fails.append((cs, str(dt), b, variant, asm, gemv.UNIT_CODES, tps, rep, e))
    gemv._ASM_ENABLED = True
    gemv.UNIT_CODES = unit_codes_default
    # dense expansion equals the reference dequantization bit for bit (written over NaN: it zeroes the
    # pruned groups itself)
    for bits, g, k in itertools.product((2, 4, 8), (16, 128), (700, 2304)):
        p = packed_case(50, k, g, bits, 0.5, False)
        for dt in (torch.float16, torch.bfloat16):
            n_run += 1
            out = torch.full(p.shape, float("nan"), dtype=dt, device=DEV)
            if not torch.equal(gemv.dequantize_dense(p, dt, out=out), reference.dequantize(p, dt)):
                fails.append(("expand", bits, g, k, str(dt)))
    # CUDA-graph capture and replay of the task-centric path
    p = packed_case(300, 2048, 16, 4, 0.5, False)
    tab = gemv.build_task_table(p)
    x = torch.randn(1, 2048, device=DEV, dtype=torch.float16)
    gemv.gqsa_linear(x, p, tasks=tab)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        yg = gemv.gqsa_linear(x, p, tasks=tab)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        gr.replay()
        n_run += 1
        e = rel_err(yg, reference.linear(x.float(), p))
        if not e < 2e-3:
            fails.append(("graph", e))
    print(f"GPU check: {n_run} runs, {len(fails)} failures")
    for f in fails[:30]:
        print("  FAIL", f)
    return not fails


# ----------------------------------------------------------------------------- sweep


def sweep(args, bw, out_records):
    shapes = [("LLaMA-2-70B", 28672, 8192), ("LLaMA-2-7B", 4096, 4096)]
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    for model, n, k in shapes:
        x = torch.randn(1, k, device=DEV, dtype=torch.float16)
        for s, g in ((0.5, 16), (0.5, 128)):
            p0 = random_packed(n, k, s, g, gen=gen)
            packs = [p0] + [clone_packed(p0) for _ in range(n_copies(p0.nbytes(), args.rot_bytes) - 1)]
            nbytes = p0.nbytes() + x.nbytes + n * 2
            roof = nbytes / (bw * 1e12) * 1e6
            confs = []  # (variant, asm, unit_codes, num_warps, units_per_thread, tasks_per_sm)
            for uc, nw, upt, tps in ((8, 4, 2, 16), (8, 4, 4, 8), (8, 2, 4, 8), (16, 4, 1, 8), (16, 4, 2, 4),
                                     (16, 4, 2, 8), (16, 4, 2, 16), (16, 2, 2, 16), (16, 4, 4, 4), (16, 4, 4, 8),
                                     (16, 8, 1, 8), (16, 8, 2, 4), (16, 2, 4, 16)):
                confs.append(("task", True, uc, nw, upt, tps))
            for uc, nw, upt in ((8, 2, 2), (16, 1, 2), (16, 2, 1), (16, 2, 2), (16, 4, 1), (16, 2, 4), (16, 1, 4)):
                confs.append(("data", True, uc, nw, upt, None))
            confs.append(("task", False, 16, 4, 2, 8))
            for variant, asm, uc, nw, upt, tps in confs:
                gemv._ASM_ENABLED = asm
                if variant == "task":
                    tab = gemv.build_task_table(p0, tasks_per_sm=tps, num_warps=nw, units_per_thread=upt,
                                                unit_codes=uc)
                    fns = [lambda p=p: gemv.gqsa_linear(x, p, tasks=tab, variant="task") for p in packs]
                    chk = lambda: gemv.gqsa_linear(x, p0, tasks=tab, variant="task")  # noqa: E731
                else:
                    bg = gemv.default_block_g(g, nw, upt, uc)

                    def run(p, bg=bg, nw=nw, uc=uc):
                        y = torch.empty(1, n, device=DEV, dtype=torch.float16)
                        gemv._launch_gemv(x, p, None, y, None, block_g=bg, num_warps=nw, unit_codes=uc)
                        return y

                    fns = [lambda p=p: run(p) for p in packs]
                    chk = lambda: run(p0)  # noqa: E731
                e = rel_err(chk(), reference.linear(x, p0).float())
                us = t_do_bench(fns, args.warmup, args.rep)
                gus = t_graph(fns)
                r = dict(model=model, N=n, K=k, S=s, G=g, variant=variant, asm=asm, unit_codes=uc, num_warps=nw,
                         units_per_thread=upt, tasks_per_sm=tps, us=us, graph_us=gus, roof_us=roof,
                         roof_pct=100 * roof / us, graph_roof_pct=100 * roof / gus, rel_err=e)
                out_records.append(r)
                print(f"{n}x{k} S{s} G{g} {variant:4s} asm={int(asm)} uc={uc} nw={nw} upt={upt} tps={tps}: "
                      f"{us:8.2f}us ({r['roof_pct']:5.1f}%)  graph {gus:8.2f}us ({r['graph_roof_pct']:5.1f}%) "
                      f"err {e:.1e}", flush=True)
            gemv._ASM_ENABLED = True
            del packs, p0
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- v1 vs v2 (issue 12)


def graph_replay_errors(plan, x, p, replays: int = 3) -> list:
    """``plan(x)`` warmed up, captured in a CUDA graph, replayed on ``replays`` fresh x: the relative error
    of each replay's output against the reference."""
    plan(x)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        yg = plan(x)
    errs = []
    for _ in range(replays):
        x.copy_(torch.randn_like(x))
        gr.replay()
        errs.append(rel_err(yg, reference.linear(x.float(), p)))
    return errs


def gpu_check_v2() -> bool:
    """The v2 kernel (gemv_layout) against the reference on the GPU: bits 2/4/8, G 16…128, fp16/bf16,
    odd shapes, empty rows, one long row, an empty layer, several unit settings, CUDA-graph replay."""
    from gqsa.kernels import gemv_layout as gl

    torch.manual_seed(0)
    fails, n_run = [], 0

    cases = []
    for bits, g in itertools.product((2, 4, 8), (16, 32, 64, 128)):
        cases.append(dict(n=97, k=1000 if g <= 64 else 1100, g=g, bits=bits, sp=0.5))
    for special in ("empty_rows", "one_row", "empty"):
        cases.append(dict(n=61, k=4096 + 40, g=16, bits=4, sp=0.4, special=special))
    cases += [dict(n=3000, k=4096, g=16, bits=4, sp=0.5), dict(n=700, k=28672, g=16, bits=4, sp=0.5),
              dict(n=300, k=11008, g=16, bits=4, sp=0.3), dict(n=200, k=8192, g=128, bits=4, sp=0.5)]
    for cs in cases:
        p = packed_case(cs["n"], cs["k"], cs["g"], cs["bits"], cs["sp"], special=cs.get("special"))
        lay = gl.build_layout(p)
        if lay is None:
            continue
        bias = torch.randn(cs["n"], device=DEV, dtype=torch.float16)
        # (dtype, unit codes, units per thread, warps, inline PTX, pipelined-kernel settings): few compiled
        # specializations; pipelined runs: register double-buffering, L2 prefetch, rows per program
        P = dict(pipeline=False)
        runs = [(torch.float16, None, None, None, True, P), (torch.bfloat16, None, None, None, True, P),
                (torch.float16, None, None, None, True, {}), (torch.bfloat16, None, None, None, True, {})]
        if cs["bits"] == 4 and cs["g"] == 16 and cs["n"] == 97:
            runs += [(torch.float16, None, None, None, False, P), (torch.float16, 8, 4, 1, True, P),
                     (torch.float16, 16, 8, 1, True, P), (torch.float16, 16, 2, 2, True, P),
                     (torch.float16, 16, 4, 4, True, P), (torch.float16, None, None, None, False, {})]
        if cs["bits"] == 4 and cs["g"] == 16:
            for upt, reg, pf, rpp, mx in ((4, True, 0, 1, None), (4, False, 2, 3, None), (4, True, 2, 5, 128),
                                          (2, True, 0, None, None), (2, False, 2, 2, None), (2, True, 2, None, None),
                                          (2, True, 4, 1, None), (1, True, 4, 7, None)):
                runs.append((torch.float16, None, upt, None, True,
                             dict(reg_pipeline=reg, prefetch=pf, rows_per_prog=rpp, maxnreg=mx)))
            runs.append((torch.bfloat16, 8, 2, None, True, dict(reg_pipeline=True, prefetch=2)))
            for upt, reg, rpp in ((4, True, None), (2, False, 1), (8, True, 3)):  # the packed-fp16 dot
                runs.append((torch.float16, None, upt, None, True,
                             dict(reg_pipeline=reg, prefetch=2, rows_per_prog=rpp, half_dot=True)))
            runs.append((torch.bfloat16, None, 4, None, True, dict(half_dot=True)))  # bf16: fp32 path
            runs.append(("big", None, 4, None, True, dict(half_dot=True)))  # |x| = 4000: no fp16 overflow
        if cs["bits"] == 4 and cs["g"] in (32, 64):  # the packed-fp16 dot on G32 / G64 (session 6: 16-code units,
            # 2 / 4 of one metadata word)
            for upt, reg, rpp, mx in ((4, True, None, None), (2, False, 1, None), (2, True, 3, None),
                                      (4, True, None, 80), (8, True, 2, None)):
                runs.append((torch.float16, None, upt, None, True,
                             dict(reg_pipeline=reg, prefetch=2, rows_per_prog=rpp, maxnreg=mx, half_dot=True)))
            runs.append(("big", None, 2, None, True, dict(half_dot=True)))
        for dt, uc, upt, nw, asm, popts in runs:
            gemv._ASM_ENABLED = asm
            big = dt == "big"
            if big:
                dt = torch.float16
            x = torch.randn(1, cs["k"], device=DEV)
            if big:  # 8 activations of ±4000 (the packed-fp16 dot's lane sums reach ~7.5 × 4000 · 15/16)
                idx = torch.randperm(cs["k"], device=DEV)[:8]
                x[0, idx] = 4000.0 * torch.sign(torch.randn(8, device=DEV))
            x = x.to(dt)
            y = torch.full((1, cs["n"]), float("nan"), device=DEV, dtype=dt)
            gl.launch(x, p, lay, bias.to(dt), y, num_warps=nw, unit_codes=uc, units_per_thread=upt, asm=asm,
                      **popts)
            e = rel_err(y, reference.linear(x.float(), p, bias.float()))
            n_run += 1
            tol = 1e-2 if dt == torch.bfloat16 else 2e-3
            if not (e < tol):
                fails.append((cs, str(dt), uc, upt, nw, asm, popts, e))
    gemv._ASM_ENABLED = True
    # the packed-fp16 dot's overflow redo (issue 12, session 5): every activation ±30000 or ±65504 (the fp16
    # maximum; fp16 lane sums of 8 products overflow in some units of most rows; scales / 1024 keep y finite in
    # fp16), and NaN activations (rows that keep one: NaN; the others: finite and right); half_dot=True and the
    # launch default (None: the half dot on the layer of ≥ HALF_MIN_CODES kept codes); rows spread over
    # programs, one row per program, 2 and 4 units per thread
    # (session 6: the same for G64 at S30, and the launch default on a G64 layer of ≥ HALF_MIN_CODES kept codes)
    for n_, k_, upt, rpp, g_ in ((97, 1000, 4, None, 16), (61, 4136, 2, 3, 16), (700, 28672, 4, 1, 16),
                                 (5000, 8192, None, None, 16), (97, 1000, 4, None, 64), (61, 4136, 2, 3, 64),
                                 (700, 28672, 4, 1, 64), (3000, 8192, None, None, 64)):
        p = packed_case(n_, k_, g_, 4, 0.5 if g_ == 16 else 0.3)
        p.scales.mul_(2.0 ** -10)  # (|y| < 30000 at ±65504 and K = 28672)
        lay = gl.build_layout(p)
        bias = torch.randn(n_, device=DEV, dtype=torch.float16)
        for kind, hd in itertools.product(("30000", "65504", "nan"), (True, None)):
            dflt = n_ in (5000, 3000)  # the launch default takes the half dot here
            if hd is None and not dflt:
                continue
            x = torch.randn(1, k_, device=DEV)
            bad = torch.zeros(1, n_, dtype=torch.bool, device=DEV)  # the rows that keep a NaN activation's group
            if kind == "nan":
                cols = torch.randperm(k_, device=DEV)[:3]
                x[0, cols] = float("nan")
                rows = torch.repeat_interleave(torch.arange(n_, device=DEV), p.row_ptr.diff().long())
                hit = torch.isin(p.col_idx.long(), cols // g_)
                bad[0, rows[hit]] = True
            else:
                x = float(kind) * torch.sign(x)
            x = x.half()
            y = torch.full((1, n_), float("nan"), device=DEV, dtype=torch.float16)
            opts = dict(units_per_thread=upt, rows_per_prog=rpp) | ({} if hd is None else dict(half_dot=hd))
            gl.launch(x, p, lay, bias, y, **opts)
            ref = reference.linear(x.float().nan_to_num(0.0), p, bias.float())  # (dense: NaN would reach every row)
            e = rel_err(y[~bad], ref[~bad]) if bool((~bad).any()) else 0.0
            n_run += 1
            ok = bool(torch.isfinite(ref[~bad]).all()) and e < 2e-3 and bool(y[bad].isnan().all())
            if hd is None and dflt:  # the default took the half dot here
                ok = ok and gl.half_dot_default(p, torch.float16, 1)
            if not ok:
                fails.append(("half-dot overflow/NaN", n_, k_, g_, kind, hd, upt, rpp, e, int(bad.sum()),
                              int(y[bad].isnan().sum())))
    # through a plan, captured in a CUDA graph
    p = packed_case(300, 2048, 16, 4, 0.5)
    plan = gemv.prepare(p, variant="data", kernel="v2")
    assert plan.layout is not None
    x = torch.randn(1, 2048, device=DEV, dtype=torch.float16)
    errs = graph_replay_errors(plan, x, p)
    n_run += len(errs)
    fails += [("graph", e) for e in errs if not e < 2e-3]
    print(f"GPU check v2: {n_run} runs, {len(fails)} failures", flush=True)
    for f in fails[:30]:
        print("  FAIL", f)
    return not fails


P2 = dict(pipeline=True)  # the pipelined kernel (gemv_layout._gemv2p_kernel)
M24 = dict(programs_per_sm=24)  # several rows per program (rows spread over 24 programs per SM)
V2_CONFIGS = {  # name -> (kernel, gemv_layout.launch arguments); "fp16" / "tg128": cuBLAS fp16, tinygemm int4 g128
    "fp16": ("fp16", None),
    "tg128": ("tg128", None),
    "v1": ("v1", None),
    "v2": ("v2", dict(pipeline=False, unit_codes=16, units_per_thread=4, num_warps=1)),  # one program per row
    "v2 uc8": ("v2", dict(pipeline=False, unit_codes=8, units_per_thread=4)),
    "v2 upt2": ("v2", dict(pipeline=False, units_per_thread=2)),
    "auto": ("auto", None),  # what gemv.prepare picks by default (kernel and launch defaults)
    "auto rowptr": ("auto", dict(uniform=False)),  # the default loading the row pointers (before session 14)
    "auto f32": ("auto", dict(half_dot=False)),  # the default without the packed-fp16 dot (the opt-out; the default
    # before session 5)
    # pipelined: u = units per thread, r = register double-buffering, pf = L2 prefetch distance (steps),
    # pps = programs per SM (rows spread evenly; no suffix: 24), rpp1 = one row per program,
    # m = ptxas register limit, h = the packed-fp16 dot (half_dot)
    "p u4 r": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=0)),
    "p u4 r m128": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=0, maxnreg=128)),
    "p u4 pf2": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=False, prefetch=2)),
    "p u4 r pf2": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2)),
    "p u4 r pf2 m128": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, maxnreg=128)),
    "p u2 r": ("v2", P2 | M24 | dict(units_per_thread=2, reg_pipeline=True, prefetch=0)),
    "p u2 pf2": ("v2", P2 | M24 | dict(units_per_thread=2, reg_pipeline=False, prefetch=2)),
    "p u2 r pf2": ("v2", P2 | M24 | dict(units_per_thread=2, reg_pipeline=True, prefetch=2)),
    "p u2 r pf4": ("v2", P2 | M24 | dict(units_per_thread=2, reg_pipeline=True, prefetch=4)),
    "p u2 r pf2 pps16": ("v2", P2 | dict(units_per_thread=2, reg_pipeline=True, prefetch=2, programs_per_sm=16)),
    "p u2 r pf2 pps32": ("v2", P2 | dict(units_per_thread=2, reg_pipeline=True, prefetch=2, programs_per_sm=32)),
    "p u2 r pf2 pps64": ("v2", P2 | dict(units_per_thread=2, reg_pipeline=True, prefetch=2, programs_per_sm=64)),
    "p u2 r pf2 rpp1": ("v2", P2 | dict(units_per_thread=2, reg_pipeline=True, prefetch=2, rows_per_prog=1)),
    "p uc8 r pf2": ("v2", P2 | M24 | dict(unit_codes=8, units_per_thread=2, reg_pipeline=True, prefetch=2)),
    "p u1 r pf4": ("v2", P2 | M24 | dict(units_per_thread=1, reg_pipeline=True, prefetch=4)),
    "p u4 r pf2 h": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, half_dot=True)),
    "p u4 r pf2 h m96": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, half_dot=True,
                                              maxnreg=96)),
    "p u4 r pf2 m80": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, maxnreg=80)),
    "p u4 r pf2 h m80": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, half_dot=True,
                                              maxnreg=80)),
    "p u4 pf2 h": ("v2", P2 | M24 | dict(units_per_thread=4, reg_pipeline=False, prefetch=2, half_dot=True)),
    "p u2 r pf2 h": ("v2", P2 | M24 | dict(units_per_thread=2, reg_pipeline=True, prefetch=2, half_dot=True)),
    "p u8 r pf2 h": ("v2", P2 | M24 | dict(units_per_thread=8, reg_pipeline=True, prefetch=2, half_dot=True)),
    "p u4 r pf2 h pps16": ("v2", P2 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, half_dot=True,
                                          programs_per_sm=16)),
    "p u4 r pf2 h pps32": ("v2", P2 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, half_dot=True,
                                          programs_per_sm=32)),
    "p u4 r pf2 h rpp1": ("v2", P2 | dict(units_per_thread=4, reg_pipeline=True, prefetch=2, half_dot=True,
                                         rows_per_prog=1)),
    "p u2 r pf2 h rpp1": ("v2", P2 | dict(units_per_thread=2, reg_pipeline=True, prefetch=2, half_dot=True,
                                         rows_per_prog=1)),
}
for _name, (_kern, _opts) in list(V2_CONFIGS.items()):  # the pipelined settings without "h" are the fp32 dot's
    # (else launch's default could take the half dot on them; session 6)
    if _name.startswith("p ") and not _opts.get("half_dot"):
        _opts["half_dot"] = False
GOAL_SHAPES = "8192x28672,28672x8192,8192x8192,4096x4096,11008x4096,4096x14336,14336x4096"


def compare_v2(args, bw, out_records, configs, shapes):
    """Batch 1, W4, S and G of --v2-sparsity / --v2-group (default S50 G16): v1 against v2 settings (and cuBLAS
    fp16 / tinygemm int4 g128), side by side, on rotated weights; graph µs (the decode engine's setting) and, with
    --v2-do-bench, do_bench µs. The v2 settings are launch arguments held by each plan (``gemv.prepare(...,
    v2_opts=...)``)."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    sp, g = args.v2_sparsity, args.v2_group
    from gqsa.kernels import gemv_layout as gl
    for model, n, k in shapes:
        p0 = random_packed(n, k, sp, g, gen=gen)
        print(f"{model:11s} {n:6d}x{k:<6d} W4 S{round(sp * 100)} G{g}: {p0.nnz} kept groups, "
              f"{p0.nnz * g / 2**20:.1f} M codes; launch default takes the half dot: "
              f"{gl.half_dot_default(p0, torch.float16, 1)}", flush=True)
        packs = [p0] + [clone_packed(p0) for _ in range(n_copies(p0.nbytes(), args.rot_bytes) - 1)]
        x = torch.randn(1, k, device=DEV, dtype=torch.float16)
        nbytes = p0.nbytes() + x.nbytes + n * 2
        roof = nbytes / (bw * 1e12) * 1e6
        ref = reference.linear(x, p0).float()
        base = {}
        for name in configs:
            kern, opts = V2_CONFIGS[name]
            e = None
            if kern in ("fp16", "tg128"):
                m = make_fp16(n, k, args.rot_bytes) if kern == "fp16" else make_tinygemm(n, k, 128, args.rot_bytes)
                fns = m.fns_for_x(x)
            else:
                plans = [gemv.prepare(p, variant="data", kernel=kern, v2_opts=opts) for p in packs]
                fns = [lambda pl=pl: pl(x) for pl in plans]
                e = rel_err(fns[0](), ref)
            fns[0]()
            torch.cuda.synchronize()
            us = t_do_bench(fns, args.warmup, args.rep) if args.v2_do_bench else float("nan")
            gus = t_graph(fns)
            base[name] = gus
            r = dict(model=model, N=n, K=k, B=1, S=sp, G=g, method=name, us=us, graph_us=gus, bytes=nbytes,
                     roof_us=roof, roof_pct=100 * roof / us, graph_roof_pct=100 * roof / gus, rel_err=e,
                     ok=True if e is None else bool(e < 1e-2), tbps_graph=nbytes / (gus * 1e-6) / 1e12)
            out_records.append(r)
            rel = "".join(f"  {gus / base[b]:.3f}x {b}" for b in ("v1", "fp16", "tg128") if b in base and b != name)
            print(f"{model:11s} {n:6d}x{k:<6d} {name:18s} graph {gus:7.2f}us {r['graph_roof_pct']:5.1f}%  "
                  f"do_bench {us:7.2f}us  roof {roof:6.2f}us  err {e if e is not None else float('nan'):.1e}{rel}",
                  flush=True)
            del fns
            if kern not in ("fp16", "tg128"):
                del plans
            torch.cuda.empty_cache()
        del packs, p0
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- v2 at M = 2-4 (issue gemvb)


def gpu_check_v2_batch(cases=None, graph=True) -> bool:
    """The v2 kernels at M = 1-5 rows of x (constexpr MB; M = 5: a launch of 4 rows and one of 1) against the
    reference on the GPU: fp16/bf16, bias, K % G != 0, empty rows, one long row (the one-program-per-row kernel
    over several steps), short rows (the pipelined kernel, rows spread over programs and one row per program),
    the plain compiled path (no inline PTX), the packed-fp16 dot, strided / misaligned x, NaN-poisoned y;
    then a plan in a CUDA graph at M = 3 and a LinearPlan whose table sends M = 3 to the GEMV."""
    import dataclasses

    from gqsa.kernels import dispatch
    from gqsa.kernels import gemv_layout as gl

    torch.manual_seed(0)
    fails, n_run = [], 0
    cases = cases or [dict(n=61, k=4096 + 40, sp=0.4, special="empty_rows"),  # K % G != 0, empty rows
             dict(n=61, k=4096 + 40, sp=0.0, special="one_row"),  # one row of every group: several steps
             dict(n=700, k=11008, sp=0.5), dict(n=300, k=28672, sp=0.5)]  # long rows (v2 one row a program)
    for cs in cases:
        p = packed_case(cs["n"], cs["k"], 16, 4, cs["sp"], special=cs.get("special"))
        lay = gl.build_layout(p)
        n, k = p.shape
        b16 = torch.randn(n, device=DEV, dtype=torch.float16)
        # (M values, dtype, bias, asm, launch options)
        runs = [((1, 2, 3, 4, 5), torch.float16, True, True, {}),
                ((2, 3, 4), torch.bfloat16, True, True, dict(pipeline=False)),
                ((2, 3, 4), torch.float16, False, True, dict(pipeline=False)),
                ((2, 3, 4), torch.float16, False, True, dict(pipeline=True)),
                ((2, 4), torch.float16, False, True, dict(pipeline=True, rows_per_prog=1)),
                ((3,), torch.float16, True, False, {}),  # the plain compiled path
                ((2,), torch.bfloat16, False, True, dict(pipeline=True)),
                ((2,), torch.float16, False, True, dict(pipeline=True, half_dot=True))]
        for ms, dt, has_b, asm, opts in runs:
            for m in ms:
                for xkind in ("plain", "strided", "offset"):
                    if xkind != "plain" and (m != 3 or asm is False or has_b):
                        continue
                    if xkind == "plain":
                        x = torch.randn(m, k, device=DEV).to(dt)
                    elif xkind == "strided":  # rows 16-byte aligned, further apart than K: no copy
                        x = torch.randn(m, k + 64 - k % 8, device=DEV).to(dt)[:, :k]
                    else:  # misaligned rows: the launcher copies
                        x = torch.randn(m, k + 3, device=DEV).to(dt)[:, 1:k + 1]
                    bias = b16.to(dt) if has_b else None
                    y = torch.full((m, n), float("nan"), device=DEV, dtype=dt)
                    try:
                        gl.launch(x, p, lay, bias, y, asm=asm, **opts)
                        torch.cuda.synchronize()
                        e = rel_err(y, reference.linear(x.float(), p, None if bias is None else bias.float()))
                    except Exception as ex:  # noqa: BLE001
                        e = repr(ex)[:200]
                    n_run += 1
                    tol = 1e-2 if dt == torch.bfloat16 else (5e-3 if opts.get("half_dot") else 2e-3)
                    if not (isinstance(e, float) and e < tol):
                        fails.append((cs, m, str(dt), has_b, asm, opts, xkind, e))
    # a plan at M = 3, captured in a CUDA graph
    p = packed_case(300, 2048, 16, 4, 0.5)
    plan = gemv.prepare(p, variant="data", kernel="v2")
    x = torch.randn(3, 2048, device=DEV, dtype=torch.float16)
    plan(x)
    if graph:
        errs = graph_replay_errors(plan, x, p)
        n_run += len(errs)
        fails += [("graph M=3", e) for e in errs if not e < 2e-3]
    # the dispatch: M = 3 through a LinearPlan whose table sends it to the GEMV
    lp = dispatch.LinearPlan(p, table=dataclasses.replace(dispatch.H200_TABLE, gemv_max_m=4))
    assert lp.path(3) == "gemv"
    for m in (2, 3, 4):
        x = torch.randn(m, 2048, device=DEV, dtype=torch.float16)
        n_run += 1
        e = rel_err(lp(x), reference.linear(x.float(), p))
        if not e < 2e-3:
            fails.append(("LinearPlan", m, e))
    print(f"GPU check v2 batch: {n_run} runs, {len(fails)} failures", flush=True)
    for f in fails[:30]:
        print("  FAIL", f)
    return not fails


V2B_SHAPES = "4096x4096,11008x4096,4096x11008,28672x8192,8192x28672"


def compare_v2_batch(args, bw, out_records, shapes, ms=(1, 2, 3, 4)):
    """W4 S50 G16, M = 1-4 rows of x: cuBLAS fp16, the old path (v2 at M = 1, v1 at M = 2, the tensor-core GEMM
    at M ≥ 3; at M = 2 the GEMM too), batched v2 (the launch defaults: the kernel by row length) and, where
    that is the one-program-per-row kernel, the pipelined one; rotated weights, graph µs."""
    from gqsa.kernels import dispatch, gemm

    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    from gqsa.kernels import gemv_layout as gl

    for n, k in shapes:
        p0 = random_packed(n, k, 0.5, 16, gen=gen)
        packs = [p0] + [clone_packed(p0) for _ in range(n_copies(p0.nbytes(), args.rot_bytes) - 1)]
        long_rows = p0.nnz >= gl.LONG_ROW_GROUPS * n
        v2 = [gemv.prepare(p, variant="data", kernel="v2") for p in packs]
        v2p = [gemv.prepare(p, variant="data", kernel="v2", v2_opts=dict(pipeline=True)) for p in packs] \
            if long_rows else None
        v1 = [gemv.prepare(p, variant="data", kernel="v1") for p in packs]
        lps = [dispatch.LinearPlan(p, gemv_plan=v) for p, v in zip(packs, v2)]
        wf = make_fp16(n, k, args.rot_bytes)
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            ref = reference.linear(x, p0).float()
            y = torch.empty(m, n, device=DEV, dtype=torch.float16)
            cfg = dispatch.H200_TABLE.config(max(2, m))
            meths = {"fp16": (wf.fns_for_x(x), None)}
            gemm_fns = [lambda pl=pl: gemm.launch_gemm(x, pl.layout, None, y, cfg, pl.sms) for pl in lps]
            old = ("v2" if m == 1 else "v1" if m == 2 else "gemm")
            if m == 1:
                meths["old"] = ([lambda pl=pl: pl(x) for pl in v2], v2[0])
            elif m == 2:
                meths["old"] = ([lambda pl=pl: pl(x) for pl in v1], v1[0])
                meths["gemm"] = (gemm_fns, None)
            else:
                meths["old"] = (gemm_fns, None)
            if m > 1:
                meths["v2b"] = ([lambda pl=pl: pl(x) for pl in v2], v2[0])
                if v2p is not None:
                    meths["v2b pipe"] = ([lambda pl=pl: pl(x) for pl in v2p], v2p[0])
            res = {}
            for name, (fns, pl) in meths.items():
                out = fns[0]()
                torch.cuda.synchronize()
                if name == "fp16":
                    e = None
                else:
                    e = rel_err(out if out is not None else y, ref)
                gus = t_graph(fns)
                res[name] = gus
                rec = dict(N=n, K=k, M=m, S=0.5, G=16, method=name, old_is=old, graph_us=gus, rel_err=e,
                           ok=True if e is None else bool(e < 1e-2))
                out_records.append(rec)
            line = f"{n:6d}x{k:<6d} M={m} " + "  ".join(f"{nm} {v:7.2f}" for nm, v in res.items())
            best = min(v for nm, v in res.items() if nm.startswith("v2b")) if m > 1 else res["old"]
            line += f"  | best-v2 {best / res['fp16']:.2f}x fp16 {best / res['old']:.2f}x old({old})"
            errs = [r for r in out_records[-len(res):] if r["rel_err"] is not None and not r["ok"]]
            print(line + (f"  ERR {[(r['method'], r['rel_err']) for r in errs]}" if errs else ""), flush=True)
            del meths, gemm_fns
        del packs, p0, v2, v2p, v1, lps, wf
        torch.cuda.empty_cache()


HB_SHAPES = "4096x4096,12288x4096,4096x11008,28672x8192"
HB_SETTINGS = {"w4s0g128": (0.0, 128), "w4s30g64": (0.3, 64)}  # name -> (sparsity, G); S0 layers are block-uniform


def compare_half_batch(args, out_records, shapes, ms=(1, 2, 3, 4), units=(2, 4), settings=HB_SETTINGS):
    """The packed-fp16 dot at several rows of x (the pipelined v2 kernel, ``half_dot=True``: its dot dequantizes
    per row), fp16, rotated weights, graph µs: cuBLAS fp16; ``plan``: a LinearPlan with the committed table (block
    layers: the GEMV at M ≤ ``dense_gemv_max_m`` when they keep every group, the block kernel above); ``f32``: the
    pipelined v2 kernel with the fp32 dot; ``half uU``: with the half dot, U units per thread. Every result checked
    against the reference. (Session 8 timed a variant that dequantizes once for all rows, commit 2882ab6, on W4 S50
    G16: no faster than the fp32 dot; this mode times the committed kernel on the wider groups.)"""
    from gqsa.kernels import dispatch
    from gqsa.kernels import gemv_layout as gl

    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    for sname, (sp, g) in settings.items():
        for n, k in shapes:
            p0 = random_packed(n, k, sp, g, gen=gen)
            packs = [p0] + [clone_packed(p0) for _ in range(n_copies(p0.nbytes(), args.rot_bytes) - 1)]
            lays = [gl.build_layout(p) for p in packs]
            plans = [dispatch.LinearPlan(p) for p in packs]
            wf = make_fp16(n, k, args.rot_bytes)
            for m in ms:
                x = torch.randn(m, k, device=DEV, dtype=torch.float16)
                ref = reference.linear(x, p0).float()
                y = torch.empty(m, n, device=DEV, dtype=torch.float16)
                meths = {"fp16": wf.fns_for_x(x), "plan": [lambda pl=pl: pl(x) for pl in plans],
                         "f32": [lambda p=p, lay=lay: gl.launch(x, p, lay, None, y, pipeline=True, half_dot=False)
                                 for p, lay in zip(packs, lays)]}
                for u in units:
                    meths[f"half u{u}"] = [lambda p=p, lay=lay, u=u: gl.launch(x, p, lay, None, y, pipeline=True,
                                                                              half_dot=True, units_per_thread=u)
                                           for p, lay in zip(packs, lays)]
                res = {}
                for name, fns in meths.items():
                    y.fill_(float("nan"))
                    out = fns[0]()
                    torch.cuda.synchronize()
                    e = None if name == "fp16" else rel_err(out if out is not None else y, ref)
                    res[name] = t_graph(fns)
                    out_records.append(dict(setting=sname, N=n, K=k, M=m, S=sp, G=g, method=name, graph_us=res[name],
                                            rel_err=e, plan_path=plans[0].path(m), ok=e is None or e < 1e-2))
                bad = [(r["method"], r["rel_err"]) for r in out_records[-len(res):] if not r["ok"]]
                print(f"{sname} {n:6d}x{k:<6d} M={m} " + " ".join(f"{nm} {v:.2f}" for nm, v in res.items())
                      + f" | plan {plans[0].path(m)}" + (f" FAIL {bad}" if bad else ""), flush=True)
            del packs, lays, plans, wf, p0
            torch.cuda.empty_cache()


V2B_SWEEP = {  # launch settings of the batched v2 kernel timed by --v2-batch-sweep (all: the pipelined kernel)
    "default": {}, "u1": dict(units_per_thread=1), "u4": dict(units_per_thread=4), "pf0": dict(prefetch=0),
    "pf4": dict(prefetch=4), "pps12": dict(programs_per_sm=12), "pps48": dict(programs_per_sm=48),
    "rpp1": dict(rows_per_prog=1), "nw2": dict(num_warps=2),
}


def sweep_v2_batch(args, out_records, shapes, ms=(2, 3, 4), out=None, meta=None):
    """Launch settings of the batched v2 kernel (:data:`V2B_SWEEP`) at M = 2-4, W4 S50 G16, rotated weights,
    graph µs; every setting checked against the reference."""
    from gqsa.kernels import gemv_layout as gl

    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    for n, k in shapes:
        p0 = random_packed(n, k, 0.5, 16, gen=gen)
        packs = [p0] + [clone_packed(p0) for _ in range(n_copies(p0.nbytes(), args.rot_bytes) - 1)]
        lays = [gl.build_layout(p) for p in packs]
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            ref = reference.linear(x, p0).float()
            y = torch.empty(m, n, device=DEV, dtype=torch.float16)
            res = {}
            for name, opts in V2B_SWEEP.items():
                o = dict(pipeline=True) | opts
                fns = [lambda p=p, lay=lay, o=o: gl.launch(x, p, lay, None, y, **o) for p, lay in zip(packs, lays)]
                y.fill_(float("nan"))
                fns[0]()
                torch.cuda.synchronize()
                e = rel_err(y, ref)
                gus = t_graph(fns, replays=7)
                res[name] = gus
                out_records.append(dict(N=n, K=k, M=m, S=0.5, G=16, method="v2b " + name, opts=o, graph_us=gus,
                                        rel_err=e, ok=bool(e < 1e-2)))
            best = min(res, key=res.get)
            print(f"{n:6d}x{k:<6d} M={m} " + " ".join(f"{nm} {v:.2f}" for nm, v in res.items())
                  + f"  | best {best} {res[best] / res['default']:.3f}x default", flush=True)
            if out is not None:
                (out / "gemv_v2_batch_sweep.json").write_text(json.dumps(dict(meta=meta, records=out_records),
                                                                         indent=1))
        del packs, lays, p0
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 shapes, batch 1, headline methods")
    ap.add_argument("--check", action="store_true", help="GPU correctness matrix of every kernel variant")
    ap.add_argument("--sweep", action="store_true", help="tuning knobs on two shapes")
    ap.add_argument("--graph", action="store_true", help="also time headline methods by CUDA-graph replay")
    ap.add_argument("--no-semi", dest="semi", action="store_false", help="skip torch 2:4 semi-structured")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gemv.json / gemv.md")
    ap.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=40, help="do_bench repetitions, ms")
    ap.add_argument("--rot-bytes", type=int, default=160 << 20, help="bytes each method's weight copies span")
    ap.add_argument("--tune-from", default=None,
                    help="gemv_sweep.json of --sweep: use its best task/data settings as the defaults")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--v2", action="store_true", help="issue 12: v2 GPU check, then v1 vs v2 at batch 1")
    ap.add_argument("--v2-configs", default="fp16,tg128,v1,v2,auto",
                    help="comma-separated names of V2_CONFIGS for every shape")
    ap.add_argument("--v2-sweep-configs", default=",".join(V2_CONFIGS),
                    help="V2_CONFIGS timed on the --v2-sweep-shapes")
    ap.add_argument("--v2-sweep-shapes", default="4096x4096,28672x8192",
                    help="NxK shapes for --v2-sweep-configs")
    ap.add_argument("--v2-shapes", default=GOAL_SHAPES, help="NxK shapes of --v2 (default: issue 12's seven)")
    ap.add_argument("--v2-do-bench", action="store_true", help="--v2: also time by do_bench")
    ap.add_argument("--v2-sparsity", type=float, default=0.5, help="--v2: sparsity of the timed layers (W4)")
    ap.add_argument("--v2-group", type=int, default=16, help="--v2: group size of the timed layers (W4)")
    ap.add_argument("--v2-no-check", dest="v2_check", action="store_false", help="--v2: skip the GPU check")
    ap.add_argument("--v2-batch", action="store_true",
                    help="v2 at M = 2-4: GPU check, then cuBLAS fp16 / old path / batched v2 at M = 1-4")
    ap.add_argument("--v2-batch-shapes", default=V2B_SHAPES, help="NxK shapes of --v2-batch")
    ap.add_argument("--half-batch", action="store_true",
                    help="the packed-fp16 dot at M = 1-4 rows of x on W4 S0 G128 / S30 G64 layers (--half-shapes)")
    ap.add_argument("--half-shapes", default=HB_SHAPES, help="NxK shapes of --half-batch")
    ap.add_argument("--v2-batch-sweep", action="store_true",
                    help="launch settings of the batched v2 kernel (V2B_SWEEP) at M = 2-4 on --v2-batch-shapes")
    args = ap.parse_args(argv)

    import triton

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), sms=torch.cuda.get_device_properties(0).multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, warmup=args.warmup, rep=args.rep,
                rot_mb=args.rot_bytes >> 20, argv=sys.argv, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                # back-to-back calls of one layer overlap under PDL (M = 1 by default since session 15)
                pdl=jit.pdl_setting())
    print(meta, flush=True)
    t0 = time.time()
    ok = True
    if args.check:
        ok = gpu_check()
        print(f"[check took {time.time() - t0:.1f}s]", flush=True)
        if not (args.quick or args.sweep):
            return 0 if ok else 1
    bw = copy_bandwidth(args.warmup, args.rep)
    meta["copy_tbps"] = bw
    print(f"copy bandwidth {bw:.3f} TB/s", flush=True)
    records: list = []
    if args.tune_from:
        meta["tuned"] = apply_tuning(args.tune_from)
        print(f"tuned defaults: {meta['tuned']}", flush=True)
    if args.half_batch:
        shapes = [tuple(int(v) for v in s_.split("x")) for s_ in args.half_shapes.split(",") if s_]
        compare_half_batch(args, records, shapes)
        (out / "gemv_half_batch.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
        bad = [r for r in records if not r["ok"]]
        print(f"[{len(records)} measurements in {time.time() - t0:.1f}s; {len(bad)} correctness failures]")
        return 0 if not bad else 1
    if args.v2_batch_sweep:
        shapes = [tuple(int(v) for v in s_.split("x")) for s_ in args.v2_batch_shapes.split(",") if s_]
        sweep_v2_batch(args, records, shapes, out=out, meta=meta)
        bad = [r for r in records if not r["ok"]]
        print(f"[{len(records)} measurements in {time.time() - t0:.1f}s; {len(bad)} correctness failures]")
        if not args.v2_batch:
            return 0 if not bad else 1
        records = []
    if args.v2_batch:
        ok = gpu_check_v2_batch() if args.v2_check else True
        print(f"[v2 batch check done at {time.time() - t0:.1f}s]", flush=True)
        shapes = [tuple(int(v) for v in s_.split("x")) for s_ in args.v2_batch_shapes.split(",") if s_]
        compare_v2_batch(args, bw, records, shapes)
        (out / "gemv_v2_batch.json").write_text(json.dumps(dict(meta=meta, check_ok=ok, records=records), indent=1))
        bad = [r for r in records if not r["ok"]]
        print(f"[{len(records)} measurements in {time.time() - t0:.1f}s; {len(bad)} correctness failures]")
        return 0 if ok and not bad else 1
    if args.v2:
        ok = gpu_check_v2() if args.v2_check else True
        print(f"[v2 check done at {time.time() - t0:.1f}s]", flush=True)
        want = [tuple(int(v) for v in s_.split("x")) for s_ in args.v2_shapes.split(",") if s_]
        names = {(n, k): m for m in MODELS for n, k in MODELS[m]}
        shapes = [(names.get(nk, "-"), *nk) for nk in want]
        sweep_shapes = {tuple(int(v) for v in s.split("x")) for s in args.v2_sweep_shapes.split(",") if s}
        for m, n, k in shapes:
            cfg = args.v2_sweep_configs if (n, k) in sweep_shapes else args.v2_configs
            compare_v2(args, bw, records, cfg.split(","), [(m, n, k)])
            (out / "gemv_v2.json").write_text(json.dumps(dict(meta=meta, check_ok=ok, records=records), indent=1))
        print(f"[{len(records)} measurements in {time.time() - t0:.1f}s; "
              f"{sum(not r['ok'] for r in records)} correctness failures]")
        return 0 if ok else 1
    if args.sweep:
        sweep(args, bw, records)
        (out / "gemv_sweep.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
        return 0 if ok else 1
    meta["cpu_overhead_us"] = cpu_overhead()
    if args.quick:
        shapes = [("LLaMA-2-7B", 4096, 4096), ("LLaMA-2-70B", 28672, 8192)]
        run_matrix(args, shapes, [1], [], [0.5], [16], bw, records)
    else:
        shapes = [(m, n, k) for m in args.models.split(",") for n, k in MODELS[m]]
        run_matrix(args, shapes, [1], [2, 4, 8, 16], [0.0, 0.3, 0.5, 0.7], [16, 32, 128], bw, records)
    (out / "gemv.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    (out / "gemv.md").write_text(markdown(records, meta))
    bad = [r for r in records if r.get("ok") is False]
    print(f"[{len(records)} measurements in {time.time() - t0:.1f}s; {len(bad)} correctness failures]")
    hl = [r for r in records if r["method"] == "GQSA W4 S50 G16 task" and r["B"] == 1]
    print("\nheadline: GQSA W4 S50 G16 task-centric, batch 1")
    for r in hl:
        print(f"  {r['N']:6d}x{r['K']:<6d} {r['us']:8.2f}us  {r['roof_pct']:5.1f}% roofline  x{r['speedup_fp16']:.2f} "
              f"fp16  x{r.get('speedup_tg128', float('nan')):.2f} tg128"
              + (f"  | graph {r['graph_us']:.2f}us {r['graph_roof_pct']:.1f}% x{r.get('graph_speedup_fp16', 0):.2f}"
                 if 'graph_us' in r else ""))
    return 0 if (ok and not bad) else 1


if __name__ == "__main__":
    sys.exit(main())
