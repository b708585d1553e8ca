#!/usr/bin/env python
"""Prefill speed, fp16 against GQSA side by side in one process: eager and engine wall time, device time.

``gqsa bench`` reports one eager prefill per generation; across processes on the H200 its fp16 figure for 512
tokens moved between 13.8 and 41.2 ms (benchmarks/RESULTS.md, session 16), so it cannot say whether a
compressed model's prefill is slower than fp16's. Here every setting's synthetic model and ``Engine`` are
built once, in one process, and timed in ``--rounds`` rounds; each round visits the settings in a rotated
order and, for every prompt shape, times

* **eager**: one prefill as ``Engine.generate`` runs it with ``prefill_graphs`` off (the forward over the
  prompt tokens and the first token's choice; synchronized wall time), host launches included;
* **generate**: the same with the engine's default, which replays a CUDA graph of a prefill shape it has
  run before, up to ``engine.PREFILL_GRAPH_TOKENS`` tokens (eager above): what a user of the engine waits for;
* **graph**: ``--replays`` replays of a CUDA graph of the same prefill (``Engine.prefill_runner(...,
  graph=True)``), CUDA events, per replay: the device's work alone.

Ratios to fp16 are taken within each round (drift of the host or clocks hits both) and their median is
reported, with the median times and the roofline of a dense prefill (2 · tokens · linear weights + causal
attention FLOPs at ``--tflops``). Before timing, every setting's graphed prefill is checked to choose the
same first tokens as its eager one, and so is the engine's own (``generate``).

    python benchmarks/prefill.py --synthetic llama-2-7b --settings fp16,w4s50g16,w4s50g16b64,w4s30g64c64 \\
        --batch 1 --prompt-len 512,2048 --rounds 10 --json prefill.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gqsa.bench.runner import kernel_breakdown  # noqa: E402
from gqsa.bench.synthetic import arch_config, build_synthetic, parse_setting  # noqa: E402
from gqsa.engine import Engine  # noqa: E402
from gqsa.report import environment  # noqa: E402

BASELINES = ("fp16", "bf16")
MODES = ("eager", "generate", "graph")


def dense_flops(cfg, batch: int, tokens: int) -> float:
    """FLOPs of a dense prefill: the blocks' linears on every token, causal attention (half of QKᵀ and PV),
    the head on the last token."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    linear = L * (h * (h + 2 * kv) + h * h + 3 * h * i)
    attention = L * 2 * tokens * tokens * h  # 4·T²·h for QKᵀ and PV, halved by the causal mask
    return batch * (2 * tokens * linear + attention + 2 * h * cfg.vocab_size)


def time_wall(run) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def time_graph(replay, n: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", default="llama-2-7b", help="architecture (gqsa.bench.synthetic.ARCHS)")
    ap.add_argument("--settings", default="fp16,w4s50g16,w4s50g16b64",
                    help="comma-separated settings; the first of fp16/bf16 is the baseline of the ratios")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", default="512", help="comma-separated prompt lengths (tokens a row)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds over every setting and shape (default 10)")
    ap.add_argument("--replays", type=int, default=5, help="graph replays timed per round (default 5)")
    ap.add_argument("--tflops", type=float, default=788.0,
                    help="dense fp16/bf16 matrix rate for the roofline, TFLOP/s (default 788: an 8192³ bf16 "
                         "product on the H200, /work/.library/device/KINDS.md)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one graph replay per setting and shape: kernel time by kind (torch.profiler)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    base = next((s for s in settings if s in BASELINES), None)
    if base is None:
        print("prefill.py: --settings needs fp16 or bf16 as the baseline", file=sys.stderr)
        return 2
    try:
        shapes = [(int(b), int(t)) for b in args.batch.split(",") for t in args.prompt_len.split(",")]
    except ValueError:
        print("prefill.py: --batch and --prompt-len take comma-separated integers, e.g. 1,4 and 512,2048",
              file=sys.stderr)
        return 2
    if args.rounds < 1 or args.replays < 1 or min(min(s) for s in shapes) < 1:
        print("prefill.py: --rounds, --replays, batch sizes and prompt lengths must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = arch_config(args.synthetic)
        parsed = {s: parse_setting(s) for s in settings}
    except ValueError as e:
        print(f"prefill.py: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("prefill.py: needs a CUDA GPU (it times CUDA graphs)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")

    engines = {}
    for s in settings:
        t0 = time.perf_counter()
        engines[s] = Engine(build_synthetic(args.synthetic, parsed[s], dev, seed=args.seed))
        print(f"[{s}] built in {time.perf_counter() - t0:.1f} s", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    prompts = {sh: torch.randint(0, cfg.vocab_size, sh, generator=gen).tolist() for sh in shapes}
    times = {(s, sh): {m: [] for m in MODES} for s in settings for sh in shapes}
    checks, profiles = {}, {}
    for sh in shapes:  # an engine holds one session (one shape): its graph is captured per shape
        graphs = {}
        for s, eng in engines.items():
            first = [t[0] for t in eng.generate(prompts[sh], 1).tokens]  # compile, prepare the launches
            again = [t[0] for t in eng.generate(prompts[sh], 1).tokens]  # (the engine's prefill graph, if small)
            graphs[s] = eng.prefill_runner(prompts[sh], graph=True)
            out = next(iter(eng._sessions.values())).out
            with torch.inference_mode():
                out.fill_(-1)
            graphs[s]()
            torch.cuda.synchronize()
            checks[(s, sh)] = out[:, 0].tolist() == first == again
            print(f"[{s}] B={sh[0]} T={sh[1]}: prefill graphs captured, same first tokens as eager: "
                  f"{checks[(s, sh)]}", flush=True)
            if args.profile:
                profiles[f"{s}/b{sh[0]}/t{sh[1]}"] = p = kernel_breakdown(graphs[s])[0]
                print(f"[{s}] kernels of one graph replay: {json.dumps(p)}", flush=True)
        for r in range(args.rounds):
            for s in settings[r % len(settings):] + settings[:r % len(settings)]:
                eng = engines[s]
                for mode, on in (("eager", False), ("generate", True)):
                    eng.prefill_graphs = on
                    times[(s, sh)][mode].append(time_wall(lambda: eng.generate(prompts[sh], 1)))
                times[(s, sh)]["graph"].append(time_graph(graphs[s], args.replays))

    rows = []
    for sh in shapes:
        flops = dense_flops(cfg, *sh)
        roof_ms = 1e3 * flops / (args.tflops * 1e12)
        for s in settings:
            t = times[(s, sh)]
            ratio = {m: statistics.median(b / a for a, b in zip(t[m], times[(base, sh)][m])) for m in MODES}
            row = {"setting": s, "batch": sh[0], "prompt_len": sh[1]}
            for m in MODES:
                row.update({f"{m}_ms": round(statistics.median(t[m]), 3), f"{m}_ms_min": round(min(t[m]), 3),
                            f"{m}_speedup_vs_base": round(ratio[m], 3)})
            row.update({"dense_roofline_ms": round(roof_ms, 3),
                        "graph_pct_of_dense_roofline": round(100 * roof_ms / statistics.median(t["graph"]), 1),
                        "graph_first_tokens_equal_eager": checks[(s, sh)]})
            row.update({f"{m}_ms_rounds": [round(x, 3) for x in t[m]] for m in MODES})
            rows.append(row)
    hdr = f"{'setting':<14}{'B':>3}{'T':>6}" + "".join(f"{m + ' ms':>13}{'× ' + base:>8}" for m in MODES) + \
        f"{'% dense roof':>14}"
    print(hdr)
    for r in rows:
        print(f"{r['setting']:<14}{r['batch']:>3}{r['prompt_len']:>6}" + "".join(
            f"{r[m + '_ms']:>13.2f}{r[m + '_speedup_vs_base']:>8.3f}" for m in MODES) +
            f"{r['graph_pct_of_dense_roofline']:>14.1f}")
    print(f"(× {base}: the median over rounds of {base}'s time / the setting's, within each round; > 1 = faster)")
    if args.json:
        out = {"environment": environment(dev), "config": vars(args), "rows": rows, "profiles": profiles}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
