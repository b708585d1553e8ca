"""Perplexity after each GQSA stage — one-shot, BQPO, BQPO+E2E-OQP — on a real model, with the
fraction of the one-shot gap to the uncompressed model that the trained stages recover.

One process runs the three stages on one calibration set: the one-shot result (``--stages oneshot``),
then BQPO, then E2E-OQP continuing from that BQPO result — exactly what ``gqsa compress --stages
bqpo`` and ``--stages bqpo+e2e`` compute with the same settings and seed (the BQPO part of a
``bqpo+e2e`` run is deterministic), without training BQPO twice. Optionally writes the three
checkpoints.

    python benchmarks/stages_table.py ../shared/assets/models/gutenberg-llama-22m \
        --calib ../shared/assets/data/gutenberg/calib.txt --eval ../shared/assets/data/gutenberg/heldout.txt \
        --sparsity 0.5 --nsamples 128 --seqlen 512 --json runs/table-gut-s50.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokenizer")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True, help="perplexity text")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", default="{}", help="JSON of further GQSAConfig settings")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where blocks train and models are evaluated (cpu, cuda)")
    ap.add_argument("--skip-fp", action="store_true", help="do not evaluate the uncompressed model")
    ap.add_argument("--fp-ppl", type=float, default=None, help="the uncompressed model's perplexity, if known")
    ap.add_argument("--kl-windows", type=int, default=64,
                    help="KL(uncompressed ‖ compressed) and top-1 agreement on the first N eval windows (0: skip)")
    ap.add_argument("--oneshot-ppl", type=float, default=None, help="the one-shot perplexity, if known (skips it)")
    ap.add_argument("--e2e-lr-sweep", default=None,
                    help="comma-separated E2E-OQP learning rates, each run from the same BQPO result (a table row each)")
    ap.add_argument("--e2e-sweep", default=None,
                    help="JSON list of GQSAConfig settings for E2E-OQP, each run from the same BQPO result "
                         "(a row each), "
                         "e.g. '[{\"e2e_lr_codes\": 0}, {\"e2e_lr_codes\": 0.003}]'")
    ap.add_argument("--sweep-only", action="store_true",
                    help="after the sweep, skip the final E2E-OQP run with the base settings")
    ap.add_argument("--save", default=None, help="write the three checkpoints under this folder")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gqsa import GQSAConfig, calib, checkpoint
    from gqsa.pipeline import compress_model, split_calibration
    from gqsa.eval.fidelity import evaluate_fidelity
    from gqsa.eval.ppl import perplexity
    from gqsa.models import load_model
    from gqsa.report import environment
    from gqsa.stages.e2e import run_e2e

    given = json.loads(args.set)
    config = GQSAConfig.preset(args.preset, bits=args.bits, group_size=args.group_size, sparsity=args.sparsity,
                               **given)
    model, tok = load_model(args.model, args.tokenizer)
    # the held-out windows (the last ones) from the text's tail, which no training window covers
    tokens = calib.calibration_tokens(args.calib, tok, args.nsamples, args.seqlen, config.seed,
                                      val_fraction=config.val_fraction)

    reference = load_model(args.model, args.tokenizer)[0].to(args.device) if args.kl_windows else None

    def ppl(m):
        m.to(args.device)
        r = perplexity(m, tok, args.eval, context=args.context, max_windows=args.max_windows, progress=False)
        if reference is not None:
            f = evaluate_fidelity(m, reference, tok, args.eval, context=args.context, max_windows=args.kl_windows,
                                  progress=False)
            r.update(kl=f["kl"], top1_agreement=f["top1_agreement"], kl_windows=f["windows"])
        m.to("cpu")
        return r

    def save(m, name):
        if args.save:
            checkpoint.save(copy.deepcopy(m).to(torch.float16), Path(args.save) / name, tok,
                            {"config": config.to_dict(), "stage": name}, overwrite=True)

    res = {"model": args.model, "calib": args.calib, "eval": args.eval, "context": args.context,
           "max_windows": args.max_windows, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "config": config.to_dict(), "environment": environment(), "stages": {}}
    if args.fp_ppl is not None:
        res["fp_ppl"] = args.fp_ppl
    elif not args.skip_fp:
        res["fp_ppl"] = perplexity(model.to(args.device), tok, args.eval, context=args.context,
                                   max_windows=args.max_windows, progress=False)["ppl"]
        model.to("cpu")
        print(f"fp: {res['fp_ppl']:.3f}", flush=True)
    t = time.time()
    if args.oneshot_ppl is not None:
        res["stages"]["oneshot"] = {"ppl": args.oneshot_ppl}
    else:
        one = load_model(args.model, args.tokenizer)[0]
        compress_model(one, GQSAConfig(**{**config.to_dict(), "stages": "oneshot"}), tokens, args.device,
                       args.batch_size, False)
        res["stages"]["oneshot"] = {"seconds": round(time.time() - t, 1), **_short(ppl(one))}
        save(one, "oneshot")
        del one
    print(f"oneshot: {res['stages']['oneshot']}", flush=True)
    t = time.time()
    stats = {}
    packed = compress_model(model, GQSAConfig(**{**config.to_dict(), "stages": "bqpo"}), tokens, args.device,
                            args.batch_size, False, stats=stats, log=lambda s: print(s, flush=True))
    res["stages"]["bqpo"] = {"seconds": round(time.time() - t, 1), **_short(ppl(model)), "stats": stats}
    save(model, "bqpo")
    print(f"bqpo: ppl {res['stages']['bqpo']['ppl']:.3f}, {res['stages']['bqpo']['seconds']} s", flush=True)
    train, val = split_calibration(tokens, config.val_fraction)

    def teacher():  # the uncompressed model, for e2e_loss="kd"
        if config.e2e_loss != "kd":
            return None
        return reference if reference is not None else load_model(args.model, args.tokenizer)[0]
    sweep = [{"e2e_lr": float(x)} for x in args.e2e_lr_sweep.split(",")] if args.e2e_lr_sweep else []
    sweep += json.loads(args.e2e_sweep) if args.e2e_sweep else []
    if sweep:
        res["e2e_sweep"] = []
        for settings in sweep:
            t = time.time()
            m, stats = copy.deepcopy(model), {}
            base = config.to_dict()
            if "e2e_loss" in settings and "e2e_lr" not in settings and "e2e_lr" not in given:
                base["e2e_lr"] = None  # the objective's rate (config.E2E_LR)
            run_e2e(m, copy.deepcopy(packed), GQSAConfig(**{**base, **settings}), train, val,
                    args.device, False, stats=stats, teacher=teacher())
            row = {"settings": settings, "seconds": round(time.time() - t, 1), **_short(ppl(m)),
                   "best_epoch": stats["e2e"]["best_epoch"], "val_loss_after": stats["e2e"]["val_loss_after"]}
            res["e2e_sweep"].append(row)
            print(f"e2e {json.dumps(settings)}: {row}", flush=True)
            del m
            if args.json:  # after every row: a run cut short keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(res, indent=1))
    if args.sweep_only:
        print("RESULT " + json.dumps({k: v for k, v in res.items() if k not in ("config", "environment", "stages")}),
              flush=True)
        return
    t = time.time()
    stats = {}
    run_e2e(model, packed, config, train, val, args.device, False, stats=stats, log=lambda s: print(s, flush=True),
            teacher=teacher())
    res["stages"]["bqpo+e2e"] = {"seconds": round(time.time() - t, 1), **_short(ppl(model)), "stats": stats}
    save(model, "bqpo+e2e")
    print(f"bqpo+e2e: ppl {res['stages']['bqpo+e2e']['ppl']:.3f}, {res['stages']['bqpo+e2e']['seconds']} s",
          flush=True)
    if "fp_ppl" in res:
        gap = res["stages"]["oneshot"]["ppl"] - res["fp_ppl"]
        for s in ("bqpo", "bqpo+e2e"):
            res["stages"][s]["recovered"] = (res["stages"]["oneshot"]["ppl"] - res["stages"][s]["ppl"]) / gap
    print("RESULT " + json.dumps({k: (v if k != "stages" else {s: {kk: vv for kk, vv in r.items() if kk != "stats"}
                                                                for s, r in v.items()})
                                  for k, v in res.items() if k not in ("config", "environment")}), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


def _short(r: dict) -> dict:
    return {k: r[k] for k in ("ppl", "kl", "top1_agreement", "windows", "kl_windows") if k in r}


if __name__ == "__main__":
    main()
