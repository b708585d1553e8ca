#!/usr/bin/env python
"""The hand-written tensor-core kernel for block-uniform 4-bit layers (``gqsa/kernels/mma_block.cu``, issue 11)
against what serves those layers today and cuBLAS fp16, side by side in one process.

Methods per shape and M: cuBLAS fp16; ``table`` = :class:`gqsa.kernels.dispatch.LinearPlan` with the mma kernel
switched off (the GEMV at M = 1, the Triton block kernel above: what a block/cluster layer ran before);
``mma`` = the hand-written kernel (split-K chosen from the grid; ``--splits`` adds forced ones). Random
block-uniform W4 layers (``gqsa.bench.synthetic.random_packed``, as ``gqsa bench --synthetic`` builds them), weights
rotated beyond the L2,
CUDA-graph timing (µs per call, median of 15 replays); roofline = (packed bytes + x + y) / the copy
bandwidth measured in the same run.

    python benchmarks/mma.py --check                         # GPU correctness (every case against the reference)
    python benchmarks/mma.py --out DIR                       # the timing matrix (mma.json, mma.md)
    python benchmarks/mma.py --out DIR --settings S50G16R64,S30G64R128 --batches 1,2,4,8,16,32
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
import gemv as bg  # noqa: E402  (shapes, random layers, timing helpers)
from gemm import layer_for_check  # noqa: E402

from gqsa.bench.synthetic import random_packed  # noqa: E402
from gqsa.kernels import dispatch, gemm, jit, mma_gemm, reference  # noqa: E402
from gqsa.kernels.block_layout import build_block_layout, detect_block_rows, detect_row_clusters  # noqa: E402
from gqsa.kernels.mma_layout import build_mma_layout  # noqa: E402

DEV = "cuda"
SHAPES = {"LLaMA-2-7B": [(4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)],  # q/k/v and gate/up fused
          "LLaMA-2-70B": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]}

CHECK_CASES = [  # n, k, G, sparsity, special, rows
    (300, 1000, 16, 0.5, None, 16), (256, 4096, 16, 0.5, "uneven", 64), (200, 520, 32, 0.4, None, 32),
    (96, 776, 64, 0.3, None, 64), (130, 1024, 128, 0.6, None, 16), (1000, 2048, 16, 0.5, None, 64),
    (1024, 2048, 16, 0.5, "uneven", 128), (512, 1024, 16, 0.5, "cluster", 64), (384, 1000, 64, 0.3, "cluster", 128),
    (256, 512, 16, 1.0, None, 64),
]


def _layout(p):
    r = detect_block_rows(p)
    if r is not None:
        return build_block_layout(p, r)
    r, row_map = detect_row_clusters(p)
    return build_block_layout(p, r, row_map=row_map)


def check() -> bool:
    ok = True
    ws = gemm.workspace(torch.device(DEV))
    for (n, k, g, sp, special, rows) in CHECK_CASES:
        p = layer_for_check(n, k, g, 4, sp, False, special, rows=rows)
        ml = build_mma_layout(_layout(p))
        w_ref = reference.dequantize(p, torch.float16).float()
        for m in (1, 2, 3, 8, 9, 16, 17, 32, 33, 47, 64):
            for split, mt in ((0, 1), (1, 1), (3, 1), (0, 2), (3, 4), (1, 8)):
                x = torch.randn(m, k, device=DEV).half()
                bias = torch.randn(n, device=DEV).half() if m % 2 else None
                ref = x.float() @ w_ref.t() + (bias.float() if bias is not None else 0)
                y = torch.full((m, n), float("nan"), device=DEV, dtype=torch.float16)
                try:
                    mma_gemm.launch_mma(x, ml, bias, y, mma_gemm.MmaConfig(split_k=split, m_tiles=mt))
                    torch.cuda.synchronize()
                    err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))
                    good = bool(torch.isfinite(y).all()) and err < 2e-3 if ref.norm() > 0 else bool((y == 0).all())
                except Exception as e:  # noqa: BLE001
                    good, err = False, repr(e)[:300]
                if not good:
                    ok = False
                    print(f"MMA CHECK FAIL {n}x{k} G{g} R{rows} {special} M={m} split={split} m_tiles={mt}: {err}",
                          flush=True)
        if bool(ws.partial.any()) or bool(ws.counters.any()):
            ok = False
            print(f"MMA CHECK FAIL {n}x{k}: split-K workspace not clean", flush=True)
        print(f"mma check {n}x{k} G{g} R{rows} {special}: done", flush=True)
    # through the plan, in a CUDA graph, with new data after capture
    p = layer_for_check(1024, 2048, 16, 4, 0.5, rows=64)
    plan = dispatch.LinearPlan(p)
    for m in (2, 4, 8):
        x = torch.randn(m, 2048, device=DEV, dtype=torch.float16)
        err = max(bg.graph_replay_errors(plan, x, p))
        if not err < 2e-3 or plan.path(m) != "mma":
            ok = False
            print(f"MMA CHECK FAIL graph M={m} ({plan.path(m)}): {err}", flush=True)
    print("mma GPU check:", "all ok" if ok else "FAILURES", flush=True)
    return ok


class Gqsa:
    """Copies of one random block-uniform layer: their plans (mma off) and mma layouts."""

    def __init__(self, n, k, sparsity, g, rows, rot, cluster=False, seed=0):
        gen = torch.Generator(device=DEV).manual_seed(seed)
        p0 = random_packed(n, k, sparsity, 4, g, DEV, gen, block_rows=rows, clustered=cluster)  # clustered: a row map
        nb = p0.nbytes()
        packs = [p0] + [bg.clone_packed(p0) for _ in range(bg.n_copies(nb, rot) - 1)]
        table = dataclasses.replace(dispatch.default_table(), block=dataclasses.replace(
            dispatch.default_table().block, mma_max_m=()))
        self.plans = [dispatch.LinearPlan(p, table) for p in packs]
        self.packs, self.table = packs, table
        assert self.plans[0].block is not None
        self.mls = [build_mma_layout(pl.block) for pl in self.plans]
        self.nbytes_w = nb
        self.n, self.k = n, k
        self.packed = p0
        self.name = f"W4 S{round(sparsity * 100)} G{g} {'cluster' if cluster else 'block'}{rows}"

    def fns(self, kind, x, split=0, waves=None, m_tiles=1):  # waves: (CTAs per SM, fewest quads per CTA) or None
        if kind.endswith("-ptr"):  # the kernels loading their block pointers (GQSA_UNIFORM=0), same process
            saved, jit.UNIFORM = jit.UNIFORM, False
            try:
                if kind == "table-ptr":  # fresh plans: their prepared calls are made (without SPB) by a first call
                    plans = [dispatch.LinearPlan(p, self.table) for p in self.packs]
                    for pl in plans:
                        pl(x)
                    return [lambda pl=pl: pl(x) for pl in plans]
                return self.fns(kind[:-4], x, split, waves, m_tiles)
            finally:
                jit.UNIFORM = saved
        if kind == "table":
            return [lambda pl=pl: pl(x) for pl in self.plans]
        y = torch.empty(x.shape[0], self.n, device=DEV, dtype=x.dtype)
        cfg = mma_gemm.MmaConfig(split_k=split, m_tiles=m_tiles)
        if waves:
            cfg = dataclasses.replace(cfg, waves=waves[0], min_quads=waves[1] or cfg.min_quads)
        calls = [mma_gemm.MmaCall(ml, cfg, x.shape[0], False, x.stride(0), y.stride(0)) for ml in self.mls]
        return [lambda c=c: c(x, None, y) for c in calls]


def measure(name, fns, x, n, nbytes_w, bw):
    fns[0]()
    torch.cuda.synchronize()
    us = bg.t_graph(fns, min_calls=64, replays=15)
    nbytes = nbytes_w + x.nbytes + x.shape[0] * n * 2
    rec = {"method": name, "M": x.shape[0], "us": us, "roof_pct": 100 * nbytes / (bw * 1e12) / (us * 1e-6)}
    return rec


def run(args, bw, records):
    settings = args.settings.split(",")
    for model, shapes in SHAPES.items():
        for (n, k) in shapes:
            if args.shapes and f"{n}x{k}" not in args.shapes.split(","):
                continue
            t0 = time.time()
            fp16 = bg.make_fp16(n, k, args.rot_bytes)
            layers = []
            for st in settings:  # e.g. S50G16R64, S30G64C128 (C: clusters through a row map)
                sp = int(st[1:st.index("G")]) / 100
                cl = "C" in st
                g = int(st[st.index("G") + 1:st.index("C" if cl else "R")])
                r = int(st[st.index("C" if cl else "R") + 1:])
                layers.append(Gqsa(n, k, sp, g, r, args.rot_bytes, cluster=cl))
            for m in [int(b) for b in args.batches.split(",")]:
                x = torch.randn(m, k, device=DEV, dtype=torch.float16)
                row = {}
                try:
                    r = measure("cuBLAS fp16", fp16.fns_for_x(x), x, n, fp16.nbytes_w, bw)
                    row["fp16"] = r["us"]
                    records.append({**r, "model": model, "N": n, "K": k})
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                for lay in layers:
                    ref = reference.linear(x.float(), lay.packed)
                    variants = [(kd, 0, None, 1) for kd in args.kinds]
                    for mt in args.m_tiles:
                        variants += [("mma", 0, None, mt)] if mt != 1 else []
                        variants += [("mma", s, None, mt) for s in args.splits]
                        variants += [("mma", 0, w, mt) for w in args.waves]
                    for kind, split, waves, mt in variants:
                        name = f"{lay.name} {kind}" + (f" mt{mt}" if mt != 1 else "")
                        name += f" split{split}" if split else ""
                        name += f" w{waves[0]:g}" + (f"q{waves[1]}" if waves[1] else "") if waves else ""
                        try:
                            fns = lay.fns(kind, x, split, waves, mt)
                            err = bg.rel_err(fns[0](), ref)
                            r = measure(name, fns, x, n, lay.nbytes_w, bw)
                            r["rel_err"] = err
                        except Exception as e:  # noqa: BLE001
                            traceback.print_exc()
                            r = {"method": name, "M": m, "error": repr(e)[:300]}
                        r.update(model=model, N=n, K=k)
                        if r.get("us") and row.get("fp16"):
                            r["x_fp16"] = row["fp16"] / r["us"]
                        records.append(r)
                print(" | ".join(f"{rec['method']} M={m} {rec.get('us', float('nan')):.2f}us "
                                 f"({rec.get('x_fp16') or 0:.2f}x, err {rec.get('rel_err', 0):.1e})"
                                 for rec in records if rec.get("N") == n and rec.get("K") == k and rec["M"] == m),
                      flush=True)
            del fp16, layers
            torch.cuda.empty_cache()
            print(f"# {model} {n}x{k}: {time.time() - t0:.0f}s", flush=True)
            if args.out:
                (Path(args.out) / "mma.json").write_text(json.dumps({"bw_tbps": bw, "records": records}, indent=1))


def markdown(records) -> str:
    lines = ["| N×K | M | " + " | ".join(sorted({r["method"] for r in records})) + " |"]
    methods = sorted({r["method"] for r in records})
    lines.append("|" + "---|" * (len(methods) + 2))
    keys = sorted({(r["N"], r["K"], r["M"]) for r in records})
    for (n, k, m) in keys:
        cells = []
        for meth in methods:
            r = next((r for r in records if (r["N"], r["K"], r["M"], r["method"]) == (n, k, m, meth)), None)
            cells.append("" if r is None or "us" not in r else f"{r['us']:.2f} ({r.get('x_fp16') or 1:.2f}×)")
        lines.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="GPU correctness only")
    ap.add_argument("--out", default=None, help="folder for mma.json and mma.md")
    ap.add_argument("--settings", default="S50G16R64,S30G64C128",
                    help="comma-separated S{sparsity%%}G{group}R{rows} (block) or ...C{rows} (clusters)")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--shapes", default="", help="only these N×K, e.g. 4096x4096,28672x8192")
    ap.add_argument("--splits", default="", help="forced split-K factors to time as well, e.g. 1,4")
    ap.add_argument("--waves", default="", help="CTAs per SM to aim the split-K at [: fewest quads per CTA], timed "
                                                "as well, e.g. 8,16:8")
    ap.add_argument("--kinds", default="table,mma", help="methods to time (table, mma; table-ptr, mma-ptr: the same "
                    "loading their block pointers, as with GQSA_UNIFORM=0)")
    ap.add_argument("--m-tiles", default="1", help="m-tiles per warp of the mma variants (--splits, --waves and, "
                    "for values other than 1, the default split), e.g. 1,2,4")
    ap.add_argument("--source", default=None, help="time another revision of mma_block.cu (an A/B in one run)")
    ap.add_argument("--rot-bytes", type=float, default=320e6)
    args = ap.parse_args(argv)
    args.splits = [int(s) for s in args.splits.split(",") if s]
    args.waves = [(float(w.split(":")[0]), int(w.split(":")[1]) if ":" in w else 0) for w in args.waves.split(",") if w]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.m_tiles = [int(t) for t in args.m_tiles.split(",") if t]
    if args.source:
        text = Path(args.source).read_text()
        mma_gemm._source = lambda: text
    if not torch.cuda.is_available():
        sys.exit("benchmarks/mma.py needs a CUDA GPU")
    if not mma_gemm.available(DEV):
        sys.exit("the hand-written kernel is not available here (see the warning above)")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.check:
        sys.exit(0 if check() else 1)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    bw = bg.copy_bandwidth(10, 50)
    print(f"# copy bandwidth {bw:.3f} TB/s", flush=True)
    records = []
    run(args, bw, records)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "mma.json").write_text(json.dumps({"bw_tbps": bw, "records": records}, indent=1))
        (Path(args.out) / "mma.md").write_text(markdown(records))
    print(markdown(records))


if __name__ == "__main__":
    main()
