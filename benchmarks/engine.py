"""End-to-end decode benchmark of issue 5 on one GPU: correctness checks first, then timings.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/engine.py --assets .carry/engine5 --out $OUT

1. Environment and a 1 GiB device-to-device copy (the bandwidth of the roofline).
2. Checks on real small models (``--assets``: a GQSA checkpoint of gutenberg-llama-22m, fp16 dense
   tensors, and one of stories260K): greedy tokens of the engine (CUDA graphs, fused projections,
   compiled pointwise ops; and the plain variants) vs transformers' ``generate``, for the GQSA model and
   for the same weights dequantized to dense fp16; the engine's decode step runs the fused GEMV kernel
   (``_gemv_kernel`` launches counted in a profile, no dense expansion); ``AutoModelForCausalLM
   .from_pretrained`` of the folder on the GPU generates the same tokens as ``gqsa.load``.
3. ``gqsa.bench.runner.run`` on the synthetic LLaMA-2-7B shape: fp16, GQSA W4 S50 G16, W4 S30 G16,
   tinygemm int4 g128, batch 1, 4, 16, with a kernel-time profile of a decode step at batch 1; then
   ablations at batch 1 (no compiled pointwise ops / no projection fusion / no CUDA graphs).

Everything goes to ``--out``: ``engine_h100.json`` (all numbers), ``log.txt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import gqsa  # noqa: E402
from gqsa.bench import runner as bench  # noqa: E402
from gqsa.engine import Engine  # noqa: E402

PROMPTS = ["It was a dark and stormy night; the rain fell in torrents", "The old man looked at the sea and said",
           "Chapter I.\n\nIn the year 1850,"]


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        y.copy_(x)
    b.record()
    torch.cuda.synchronize()
    return 2 * 2**30 * 10 / (a.elapsed_time(b) / 1e3) / 1e12  # TB/s, read + write


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def checks(assets: Path, log) -> dict:
    from transformers import AutoModelForCausalLM

    res = {}
    folder = assets / "g22m-w4s50g16"
    for label in ("gqsa", "dense"):
        model, tok = gqsa.load(folder, device="cuda", dtype=torch.float16)
        if label == "dense":
            bench.dense_from_gqsa(model, torch.float16)
        ids = [tok(p).input_ids for p in PROMPTS]
        n = 32
        hf = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in ids]
        variants = {"graphs+fuse+compile": dict(), "graphs, plain ops": dict(fuse_projections=False, compile_ops=False),
                    "eager, plain ops": dict(cuda_graphs=False, fuse_projections=False, compile_ops=False),
                    "eager+fuse+compile": dict(cuda_graphs=False)}
        out = {}
        for vname, kw in variants.items():
            m2, _ = gqsa.load(folder, device="cuda", dtype=torch.float16)  # fusion re-points modules: fresh copy
            if label == "dense":
                bench.dense_from_gqsa(m2, torch.float16)
            eng = Engine(m2, compile_ops=kw.get("compile_ops", "auto"), fuse_projections=kw.get("fuse_projections", "auto"),
                         cuda_graphs=kw.get("cuda_graphs", "auto"))
            toks = eng.generate(ids, n).tokens  # batch of 3 (left padding)
            single = [eng.generate([p], n).tokens[0] for p in ids]
            out[vname] = {"batch_tokens": toks, "single_tokens": single,
                          "agree_with_hf_batch": [agree(a, b) for a, b in zip(toks, hf)],
                          "agree_with_hf_single": [agree(a, b) for a, b in zip(single, hf)]}
            log(f"[check {label}] {vname}: tokens equal to HF greedy (of {n}) batch {out[vname]['agree_with_hf_batch']}, "
                f"single {out[vname]['agree_with_hf_single']}")
            if vname == "graphs+fuse+compile" and label == "gqsa":
                from torch.profiler import ProfilerActivity, profile

                s = next(iter(eng._sessions.values()))
                kv = s.max_len
                with torch.inference_mode():
                    s.slot.fill_(kv - 3)
                    s.step.zero_()
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        eng._decode_body(s, kv, True)  # eager: every launch visible
                        torch.cuda.synchronize()
                names = [e.name for e in prof.events()
                         if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
                res["kernel_path"] = {"gemv_launches_per_step": sum("_gemv_kernel" in x for x in names),
                                      "expand_launches_per_step": sum("_expand_kernel" in x for x in names),
                                      "expected_gemv": 4 * model.config.num_hidden_layers,
                                      "qkv_paths_m1_m3": sorted({(b.qkv._plan.path(1), b.qkv._plan.path(3))
                                                                 for b in eng.decoder.blocks
                                                                 if b.qkv._plan is not None})}
                log(f"[check] kernel path: {res['kernel_path']}")
            del eng, m2
        res[label] = {"hf_tokens": hf, "variants": out, "text_hf_0": tok.decode(hf[0])}
        log(f"[check {label}] HF: {tok.decode(hf[0])!r}")
        del model
    try:  # transformers' own loader, on the GPU
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).to("cuda")
        r, tok = gqsa.load(folder, device="cuda", dtype=torch.float16)
        p = torch.tensor([tok(PROMPTS[0]).input_ids], device="cuda")
        a = m.generate(p, max_new_tokens=16, do_sample=False)
        b = r.generate(p, max_new_tokens=16, do_sample=False)
        res["from_pretrained_gpu"] = {"equal_to_gqsa_load": bool(torch.equal(a, b)),
                                      "layer_type": type(m.model.layers[0].self_attn.q_proj).__name__}
    except Exception as e:  # noqa: BLE001 - report, do not stop the benchmark
        res["from_pretrained_gpu"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    log(f"[check] from_pretrained on GPU: {res['from_pretrained_gpu']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=".carry/engine5", help="folder with g22m-w4s50g16 (GQSA checkpoint)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="llama-2-7b")
    ap.add_argument("--settings", default="fp16,w4s50g16,w4s30g16,tinygemm")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    result = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    result["environment"] = bench.environment("cuda")
    result["copy_tb_s"] = round(copy_bandwidth(), 3)
    log(f"env {result['environment']}, copy {result['copy_tb_s']} TB/s")
    path = out / "engine_h100.json"

    def save():
        path.write_text(json.dumps(result, indent=2))

    if not args.skip_checks:
        t = time.time()
        try:
            result["checks"] = checks(Path(args.assets), log)
        except Exception as e:  # noqa: BLE001
            result["checks"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            log(f"[check] FAILED: {result['checks']['error']}\n{result['checks']['trace']}")
        result["checks_s"] = round(time.time() - t, 1)
        save()
    batches = [int(b) for b in args.batches.split(",")]
    settings = args.settings.split(",")
    t = time.time()
    main_run = bench.run(settings, batches, synthetic=args.arch, device="cuda", prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, repeats=args.repeats, profile=True, log=log)
    result["bench"] = main_run
    result["bench_s"] = round(time.time() - t, 1)
    save()
    log("\n" + bench.format_table(main_run))
    if not args.skip_ablation:
        abl = {}
        for name, kw in (("no compiled ops", dict(compile_ops=False)),
                         ("no compiled ops, no fusion", dict(compile_ops=False, fuse=False)),
                         ("no CUDA graphs", dict(cuda_graphs=False))):
            try:
                r = bench.run(["fp16", "w4s50g16"], [1], synthetic=args.arch, device="cuda",
                              prompt_len=args.prompt_len, new_tokens=min(args.new_tokens, 64), repeats=2, log=log, **kw)
                abl[name] = r["rows"]
                log(f"[ablation {name}]\n" + bench.format_table(r))
            except Exception as e:  # noqa: BLE001
                abl[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"[ablation {name}] FAILED {e}")
            save()
        result["ablation"] = abl
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save()
    log("\n" + bench.format_table(main_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
