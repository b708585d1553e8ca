"""CPU inference of a GQSA checkpoint against its dense twin, side by side in one process.

The dense twin is the same folder with every ``GQSALinear`` replaced by an ``nn.Linear`` holding its
dequantized weight (``gqsa bench``'s ``fp16`` setting, here in float32): the same weights, the same
modules, dense. Both run the work of ``gqsa generate`` (the decode engine: one prompt, greedy,
``--new-tokens`` tokens) and of ``gqsa eval --ppl`` (``--windows`` windows of the model's context,
batches of 4), alternately (dense, GQSA, dense, GQSA, …) ``--repeats`` times after one untimed
warm-up each; the medians and the ratio GQSA/dense of speeds are printed, and written as JSON with
``--json``. The greedy tokens and the perplexities of the two must be equal (the GQSA path is the
same float32 weight, cached), which is checked.

    python benchmarks/cpu_inference.py runs/stories260K-w4s50g16 --ppl ../shared/assets/data/gutenberg/heldout.txt
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="+", help="GQSA checkpoint folders")
    p.add_argument("--ppl", required=True, help="text for the perplexity part")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=8, help="perplexity windows per run (default 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: gqsa's default thread count")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from gqsa import checkpoint, runtime
    from gqsa.engine import Engine, SamplingParams
    from gqsa.bench.runner import dense_from_gqsa
    from gqsa.eval.ppl import perplexity

    threads = runtime.set_threads(args.threads)
    out = {"threads": threads, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "torch": torch.__version__,
           "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "models": {}}
    print(f"torch threads {threads}; load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for folder in args.folder:
        gq, tok = checkpoint.load(folder, device="cpu", dtype=torch.float32)
        dense, _ = checkpoint.load(folder, device="cpu", dtype=torch.float32)
        dense_from_gqsa(dense, torch.float32)
        models = {"dense": dense, "gqsa": gq}
        engines = {k: Engine(m) for k, m in models.items()}
        ids = [tok(args.prompt).input_ids]
        times = {k: {"generate": [], "ppl": []} for k in models}
        results = {}
        for rep in range(args.repeats + 1):  # the first round is the warm-up
            for k in models:
                t0 = time.perf_counter()
                g = engines[k].generate(ids, args.new_tokens, SamplingParams(), eos_token_id=None)
                t1 = time.perf_counter()
                r = perplexity(models[k], tok, args.ppl, batch_size=4, max_windows=args.windows, progress=False)
                t2 = time.perf_counter()
                results[k] = (g.tokens[0], r["ppl"], r["windows"] * r["context"])
                if rep:
                    times[k]["generate"].append(t1 - t0)
                    times[k]["ppl"].append(t2 - t1)
        assert results["dense"][0] == results["gqsa"][0], "greedy tokens differ between GQSA and its dense twin"
        assert results["dense"][1] == results["gqsa"][1], "perplexities differ between GQSA and its dense twin"
        n_tok, n_eval = args.new_tokens, results["gqsa"][2]
        row = {}
        for k in models:
            g, e = statistics.median(times[k]["generate"]), statistics.median(times[k]["ppl"])
            row[k] = {"generate_s": round(g, 4), "generate_tokens_per_s": round(n_tok / g, 1),
                      "eval_s": round(e, 4), "eval_tokens_per_s": round(n_eval / e, 1),
                      "generate_s_runs": [round(t, 4) for t in times[k]["generate"]],
                      "eval_s_runs": [round(t, 4) for t in times[k]["ppl"]]}
        row["speed_ratio_generate"] = round(row["dense"]["generate_s"] / row["gqsa"]["generate_s"], 3)
        row["speed_ratio_eval"] = round(row["dense"]["eval_s"] / row["gqsa"]["eval_s"], 3)
        row["cache_bytes"] = sum(m._dense[1].numel() * m._dense[1].element_size()
                                 for m in gq.modules() if getattr(m, "_dense", None) is not None)
        row["ppl"] = results["gqsa"][1]
        out["models"][str(folder)] = row
        print(f"{folder}: generate {n_tok} tokens: dense {row['dense']['generate_tokens_per_s']} tok/s, "
              f"gqsa {row['gqsa']['generate_tokens_per_s']} tok/s (x{row['speed_ratio_generate']}); "
              f"eval {n_eval} tokens: dense {row['dense']['eval_tokens_per_s']} tok/s, "
              f"gqsa {row['gqsa']['eval_tokens_per_s']} tok/s (x{row['speed_ratio_eval']}); "
              f"weight cache {row['cache_bytes'] / 2**20:.1f} MiB", flush=True)
    out["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
