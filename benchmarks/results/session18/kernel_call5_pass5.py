"""Call 5: the pre pass's tiles per program × warps (zeroed tails, as the TMA kernels run it), alone; writes the
table with the best pair in the pre buckets (GQSA_DISPATCH_TABLE format)."""
import dataclasses, json, sys
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[3]  # (ran from .carry/me/ as parents[2]; committed here)
sys.path.insert(0, str(ROOT / "src")); sys.path.insert(0, str(ROOT / "benchmarks"))
import gemv as bg
import gemm as bgemm
from gqsa.kernels import block_gemm, dispatch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]
KINDS = [("b128", 128, 0.5, 16, False), ("b64", 64, 0.5, 16, False), ("c64g64", 64, 0.3, 64, True)]
VARIANTS = [(t, w) for t in (1, 2, 4, 8) for w in (2, 4, 8)]


def main(out):
    res = []
    for kind, rows, sp, g, cl in KINDS:
        for n, k in SHAPES:
            meth = bgemm.BlockMethod(n, k, sp, g, rows, 256 << 20, cluster=cl)
            rec = {"kind": kind, "n": n, "k": k,
                   "bytes": int(sum(t.numel() * t.element_size() for t in (meth.layouts[0].qweight, meth.layouts[0].sz)))}
            for t, w in VARIANTS:
                ds = [block_gemm._Dequant(lay, torch.float16, True, t, w) for lay in meth.layouts]
                ds[0]()
                rec[f"t{t}w{w}"] = round(bg.t_graph([d.__call__ for d in ds], min_calls=16), 2)
            wd = ds[0]()
            rec["write_bytes"] = wd.numel() * 2
            print(json.dumps(rec), flush=True)
            res.append(rec)
            del meth, ds
            torch.cuda.empty_cache()
    tot = {f"t{t}w{w}": sum(r[f"t{t}w{w}"] for r in res) for t, w in VARIANTS}
    best = min(tot, key=tot.get)
    print("totals", json.dumps({k: round(v, 1) for k, v in tot.items()}), "best", best, flush=True)
    t, w = (int(x) for x in best[1:].split("w"))
    tab = dispatch.H200_TABLE.block
    buckets = tuple((r, tuple((m, dataclasses.replace(c, pre_tiles=t, pre_warps=w) if c.pre else c) for m, c in bk))
                    for r, bk in tab.buckets)
    table = dataclasses.replace(dispatch.H200_TABLE, block=dataclasses.replace(tab, buckets=buckets))
    Path(out, "table_pass.json").write_text(json.dumps(dispatch.table_to_json(table), indent=1))
    Path(out, "pass5.json").write_text(json.dumps({"records": res, "totals": tot, "best": best}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
