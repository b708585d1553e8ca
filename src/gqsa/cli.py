"""The ``gqsa`` command line: ``compress``, ``eval``, ``inspect``, ``report``, ``generate``, ``bench``."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

EPILOG = """\
examples (offline, with the local assets):
  gqsa compress ../shared/assets/models/stories260K/stories260K.bin \\
      --tokenizer ../shared/assets/models/stories260K/tok512.bin \\
      --bits 4 --group-size 16 --sparsity 0.5 \\
      --calib ../shared/assets/data/wikitext2/wiki.valid.tokens --nsamples 128 --seqlen 256 \\
      --out runs/stories260K-w4s50g16
  gqsa eval runs/stories260K-w4s50g16 --ppl ../shared/assets/data/wikitext2/wiki.test.raw
  gqsa inspect runs/stories260K-w4s50g16

online (a hub model id and a dataset name):
  gqsa compress meta-llama/Llama-2-7b-hf --calib wikitext2 --out runs/llama2-7b-w4s50g16
  gqsa eval runs/llama2-7b-w4s50g16 --ppl wikitext2

several GPUs (data-parallel BQPO and E2E-OQP; rank 0 writes the folder):
  torchrun --standalone --nproc-per-node 4 -m gqsa.cli compress meta-llama/Llama-2-7b-hf \
      --calib wikitext2 --out runs/llama2-7b-w4s50g16
"""


METHODS = ("gqsa", "rtn", "gptq", "wanda", "sparsegpt", "magnitude")
ALLOCATIONS = ("row", "layer", "block16", "block32", "block64", "block128", "cluster16", "cluster32", "cluster64", "cluster128")  # gqsa.config.ALLOCATIONS (torch-free here)
THREADS_HELP = ("CPU threads of torch (default: the cores free now — CPUs minus the 1-minute load average, at "
                "least 1 — or $GQSA_THREADS)")
COMPRESS_THREADS_HELP = ("CPU threads of torch (default: torch's own, one per core, so that a rerun or --resume "
                         "computes the same; idle threads sleep instead of spinning, OMP_WAIT_POLICY=PASSIVE)")
_OWN_PROCESS = False  # main() runs in a process of its own (torch not imported before): it picks the threads


def _add_threads(p):
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def _apply_threads(args, default: bool = True):
    """``--threads``, else (``default``, in the ``gqsa`` process itself) :func:`gqsa.runtime.default_threads`;
    a Python caller's own torch setting is left alone."""
    from .runtime import set_threads

    if args.threads is not None and args.threads <= 0:
        raise CLIError("--threads must be positive")
    if args.threads is not None or (default and _OWN_PROCESS):
        set_threads(args.threads)


class CLIError(Exception):
    """An error of the user's input: printed as one line, exit status 2."""


def _add_compress(sub):
    p = sub.add_parser(
        "compress", help="compress a model with GQSA and write a packed checkpoint folder",
        description="Group-prune and group-quantize every linear of a model's decoder blocks, calibrated "
                    "block by block on text, and write a packed BSR checkpoint folder (atomically).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("model", help="Hugging Face model id or folder, or a llama2.c .bin checkpoint")
    p.add_argument("--tokenizer", help="tokenizer (llama2.c tok*.bin, SentencePiece .model, folder or hub id); "
                                       "default: the model's own, or the tok*.bin beside a llama2.c file")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--method", default="gqsa", choices=METHODS,
                   help="gqsa (default), or a baseline for side-by-side comparisons")
    g = p.add_argument_group("GQSA settings")
    g.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="weight bits (default 4)")
    g.add_argument("--group-size", type=int, default=16, choices=(16, 32, 64, 128),
                   help="group width G: one pruning unit = one quantization group (default 16)")
    g.add_argument("--sparsity", type=float, default=0.5, help="fraction of groups removed (default 0.5)")
    g.add_argument("--saliency", default="hessian", choices=("magnitude", "wanda", "hessian"),
                   help="group ranking; hessian also compensates the kept weights (default hessian)")
    g.add_argument("--allocation", default="row", choices=ALLOCATIONS,
                   help="row: same kept-group count in every row; layer: ranked per layer; blockR: the same kept "
                        "columns in every R consecutive rows, for the block kernels; clusterR: the same in clusters "
                        "of R rows chosen to keep the most (default row)")
    g.add_argument("--quant-init", default="mse", choices=("minmax", "mse"),
                   help="scale/zero init: min-max or clipping search (default mse)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diagonal")
    g.add_argument("--mask", default=None, metavar="METHOD",
                   help="group mask with hessian saliency: fixed (ranked once), cgN (fixed, then N conjugate-gradient steps of "
                        "a least-squares re-fit of the kept groups), rerankN (N rounds of rank, prune, re-fit), iterN "
                        "(N rounds with an exact re-fit) or adaptive[B] (per B groups during the sweep) "
                        "(default: gqsa.config's)")
    g.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="choose each linear's sparsity (row-balanced) so the compressed linears take at most B "
                        "bits/weight at the least measured error; replaces --sparsity")
    g.add_argument("--skip", nargs="*", default=[], metavar="SUFFIX",
                   help="module-name suffixes to leave dense, e.g. mlp.down_proj")
    t = p.add_argument_group(
        "GQSA training stages",
        "BQPO trains each block's latent weights and s, z through fake quantization (mask held) to match the "
        "uncompressed block; E2E-OQP then trains the scales end to end with the codes and mask frozen. Unset "
        "options take the --preset's value (see gqsa.config.PRESETS); all are recorded in gqsa_report.json")
    t.add_argument("--stages", default="bqpo+e2e", choices=("oneshot", "bqpo", "bqpo+e2e"),
                   help="oneshot: no training; bqpo: block-wise; bqpo+e2e: then end to end (default)")
    t.add_argument("--preset", default="default", choices=("default", "fast"),
                   help="fast: ~4x fewer epochs (CPU runs of small models, quick checks)")
    t.add_argument("--resume", action="store_true",
                   help="continue a killed run from its work folder <out>.partial (same settings and data); "
                        "the result is bitwise that of an uninterrupted run")
    t.add_argument("--val-fraction", type=float, help="calibration windows held out for early stopping "
                                                      "and best-epoch selection (default 0.1)")
    t.add_argument("--bqpo-epochs", type=int, help="BQPO epochs per block (default 20; fast: 5)")
    t.add_argument("--bqpo-batch-size", type=int, help="BQPO windows per step (default 4)")
    t.add_argument("--bqpo-lr-weight", type=float,
                   help="BQPO AdamW lr of the latent weights, in quantization steps per update (default 0.1)")
    t.add_argument("--bqpo-lr-scale", type=float, help="BQPO lr of the scales, relative (default 0.03)")
    t.add_argument("--bqpo-lr-zero", type=float, help="BQPO lr of the zero points, in codes (default 0.1)")
    t.add_argument("--bqpo-patience", type=int, help="BQPO: stop a block after this many epochs without a "
                                                     "better held-out loss (default 4; fast: 2)")
    t.add_argument("--bqpo-target", choices=("fp", "qinput"),
                   help="fp: uncompressed block on uncompressed inputs (default); qinput: uncompressed block "
                        "on the compressed model's inputs")
    t.add_argument("--e2e-epochs", type=int, help="E2E-OQP epochs (default 5; fast: 2)")
    t.add_argument("--e2e-batch-size", type=int, help="E2E-OQP windows per micro-batch (default 4)")
    t.add_argument("--e2e-grad-accum", type=int, help="E2E-OQP micro-batches per optimizer step (default 1)")
    t.add_argument("--e2e-lr", type=float, help="E2E-OQP lr of the scales, relative (default 1e-3)")
    t.add_argument("--e2e-loss", choices=("lm", "kd"),
                   help="E2E-OQP objective: lm = causal-LM loss on the calibration text (default); kd = KL to the "
                        "uncompressed model (fidelity; holds a copy of it)")
    t.add_argument("--e2e-train-zero", action="store_true",
                   help="E2E-OQP also trains the zero points (then stored as float16)")
    t.add_argument("--no-grad-checkpointing", action="store_true",
                   help="E2E-OQP without recomputing blocks in the backward pass (faster, more memory)")
    t.add_argument("--amp", choices=("auto", "none", "bfloat16", "float16"),
                   help="autocast of the trained stages (default auto: bfloat16 on CUDA, none on CPU)")
    t.add_argument("--activation-dtype", choices=("float32", "bfloat16", "float16"),
                   help="storage dtype of the calibration activations between blocks (default float32)")
    t.add_argument("--offload-activations", action="store_true",
                   help="keep those activations in CPU memory, streaming batches to the device")
    t.add_argument("--threads", type=int, default=None, help=COMPRESS_THREADS_HELP)
    b = p.add_argument_group(
        "baseline settings (--method rtn|gptq|wanda|sparsegpt|magnitude)",
        "rtn/gptq use --bits and --group-size (every group kept; written in the packed format); "
        "wanda/sparsegpt/magnitude keep fp16 values and are written dense with zeros")
    b.add_argument("--pattern", default="2:4",
                   help="wanda/sparsegpt/magnitude: n:m (keep n of every m inputs, default 2:4) or "
                        "'unstructured' (removes --sparsity of the weights)")
    b.add_argument("--act-order", action="store_true",
                   help="gptq: quantize columns in order of decreasing activation energy (static groups)")
    b.add_argument("--clip-search", action="store_true",
                   help="rtn/gptq: MSE clipping search for scales instead of the papers' min-max")
    b.add_argument("--prune-bits", type=int, choices=(2, 3, 4, 8), default=None,
                   help="sparsegpt: also quantize the kept weights to this many bits in the same sweep, groups of "
                        "--group-size inputs (e.g. --pattern 2:4 --prune-bits 4 --group-size 128: 2:4 + int4)")
    b.add_argument("--blocksize", type=int, default=128,
                   help="gptq/sparsegpt: lazy-update block width in columns (default 128)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", required=True,
                   help="calibration text file, a dataset name (wikitext2, c4, ptb) when online, or 'self': "
                        "windows sampled from the uncompressed model itself (no data needed; seeded by --seed)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seqlen", type=int, default=2048,
                   help="tokens per window, capped at the model's context (default 2048)")
    c.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    c.add_argument("--seed", type=int, default=0, help="seed of the window sampling (default 0)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="where blocks are compressed (default: cuda if present, else cpu)")
    r.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="compute dtype of the model while compressing (default float32)")
    r.add_argument("--dense-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="storage dtype of the dense tensors (embeddings, norms, lm_head); "
                        "auto = the source checkpoint's (default)")
    p.set_defaults(func=cmd_compress)


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity of a GQSA checkpoint (or of an uncompressed model)",
                       description="Perplexity by the GPTQ protocol: the text tokenized once, cut into "
                                   "non-overlapping windows of the context, mean token NLL, exp. For a GQSA "
                                   "folder the result is also appended to its gqsa_report.json.")
    p.add_argument("model", help="GQSA checkpoint folder, or any model `compress` accepts")
    p.add_argument("--tokenizer", help="tokenizer, for uncompressed llama2.c models")
    p.add_argument("--ppl", nargs="+", default=[], metavar="TEXT",
                   help="text file(s), or dataset name(s) (wikitext2, ptb, c4) when online")
    p.add_argument("--context", type=int, default=None, help="window length (default min(2048, model max))")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="compute dtype; auto = float32 on CPU, float16 on GPU (default auto)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the safetensors files")
    z = p.add_argument_group("zero-shot and fidelity")
    z.add_argument("--tasks", nargs="*", default=None, metavar="TASK",
                   help="zero-shot log-likelihood tasks: piqa arc_easy arc_challenge boolq winogrande "
                        "lambada_openai (all of them when given without names), or .jsonl task files")
    z.add_argument("--tasks-dir", default=None,
                   help="folder of the task files (default: $GQSA_TASKS_DIR, else ../shared/assets/data/zeroshot)")
    z.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    z.add_argument("--lm-eval", action="store_true",
                   help="run --tasks through the lm-eval harness (if installed; it fetches its datasets)")
    z.add_argument("--zeroshot-batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    z.add_argument("--kl-reference", default=None, metavar="MODEL",
                   help="uncompressed model to measure KL(reference || model) and top-1 agreement against")
    z.add_argument("--kl-text", default=None, help="text for the KL measurement (default: the first --ppl text)")
    z.add_argument("--kl-windows", type=int, default=None,
                   help="windows for the KL measurement (default: --max-windows, else all)")
    _add_threads(p)
    p.set_defaults(func=cmd_eval)


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="per-layer and whole-model storage of a GQSA checkpoint",
                       description="Validate a checkpoint folder and print, per compressed layer, its shape, "
                                   "sparsity, bits, bytes and bits/weight; then the whole model's size on disk "
                                   "vs fp16 and its bits per weight.")
    p.add_argument("folder", help="GQSA checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    p.set_defaults(func=cmd_inspect)


def _add_report(sub):
    p = sub.add_parser(
        "report", help="GQSA and the baselines side by side: perplexity, zero-shot, KL, bits/weight, size",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a matrix of `gqsa compress` settings on one model (default: fp16; GQSA W4 S30/S50/S70 "
                    "at G16 and G32; SparseGPT, Wanda and magnitude 2:4; GPTQ W2/W3/W4 g128; RTN W4 g128), "
                    "evaluate every row and write OUT/report.md, report.json and report.png (perplexity vs "
                    "bits/weight; needs matplotlib). Finished rows are kept in OUT/rows/*.json: rerunning "
                    "the same command resumes.",
        epilog="example:\n  gqsa report ../shared/assets/models/gutenberg-llama-22m \\\n"
               "      --calib ../shared/assets/data/gutenberg/calib.txt \\\n"
               "      --eval ../shared/assets/data/gutenberg/heldout.txt --context 512 --limit 200 --out runs/report")
    p.add_argument("model", help="model folder, hub id or llama2.c .bin checkpoint (uncompressed)")
    p.add_argument("--tokenizer", help="tokenizer, for llama2.c models whose tokenizer is not beside them")
    p.add_argument("--calib", required=True, help="calibration text file (or dataset name when online)")
    p.add_argument("--eval", required=True, dest="eval_text", metavar="TEXT",
                   help="perplexity text (also the KL text)")
    p.add_argument("--out", required=True, help="report folder (reused to resume)")
    p.add_argument("--rows", nargs="+", default=None, metavar="NAME", help="only these default rows (by name)")
    p.add_argument("--add-row", action="append", default=[], metavar="NAME=ARGS",
                   help="an extra row: NAME=`gqsa compress` arguments, e.g. "
                        "'gqsa-w4s50g16-bqpo=--method gqsa --sparsity 0.5 --stages bqpo'")
    p.add_argument("--gqsa-stage", default="oneshot",
                   help="training stages of the default GQSA rows (passed as --stages when compress has it; "
                        "default oneshot)")
    p.add_argument("--gqsa-args", default="", help="further `gqsa compress` arguments for every GQSA row (one string)")
    p.add_argument("--context", type=int, default=None, help="perplexity window (default min(2048, model max))")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity on the first N windows only")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: --context)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--tasks", nargs="*", default=None, metavar="TASK",
                   help="zero-shot tasks (default: all six local ones; give none to skip zero-shot)")
    p.add_argument("--tasks-dir", default=None, help="folder of the task files (default: the shared assets')")
    p.add_argument("--limit", type=int, default=100, help="documents per zero-shot task (default 100; 0 = all)")
    p.add_argument("--kl-windows", type=int, default=32, help="windows for KL/top-1 agreement (default 32; 0 = skip)")
    p.add_argument("--batch-size", type=int, default=4, help="perplexity windows per forward pass (default 4)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT/checkpoints/NAME folders")
    _add_threads(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    import shlex

    from .report_matrix import rows_from_cli, run_report

    for name in ("nsamples", "batch_size"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    rows = rows_from_cli(args.rows, args.add_row)
    _apply_threads(args)
    command = "gqsa " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["report"] else None
    run_report(args.model, args.calib, args.eval_text, args.out, tokenizer=args.tokenizer, rows=rows,
               context=args.context, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
               eval_batch_size=args.batch_size, tasks=args.tasks, tasks_dir=args.tasks_dir,
               limit=args.limit or None, kl_windows=args.kl_windows, max_windows=args.max_windows,
               device=args.device, gqsa_stage=args.gqsa_stage, gqsa_args=shlex.split(args.gqsa_args),
               keep_checkpoints=args.keep_checkpoints, command=command)
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text from a GQSA checkpoint (or any LLaMA model), streaming",
                       description="Generate with the decode engine (static KV cache; CUDA graphs on a GPU): "
                                   "greedy by default, sampling with --temperature > 0. One prompt streams its "
                                   "tokens to the terminal; several are decoded as one batch.",
                       epilog="example:\n  gqsa generate runs/stories260K-w4s50g16 --prompt 'Once upon a time' "
                              "--max-new-tokens 64",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GQSA checkpoint folder (or an uncompressed model `compress` accepts)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text; repeat for a batch of prompts")
    p.add_argument("--tokenizer", help="tokenizer, for uncompressed llama2.c models")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the safetensors files")
    _add_threads(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from . import checkpoint
    from .engine import Engine, SamplingParams
    from .models import load_model

    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if any(not p for p in args.prompt):
        raise CLIError("--prompt is empty: give some text to continue")
    _apply_threads(args)
    device = _device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    folder = Path(args.model)
    if _is_gqsa_folder(folder):
        model, tok = checkpoint.load(folder, device=device, dtype=dtype, verify=not args.no_verify)
        if tok is None:
            raise CLIError(f"{folder} has no tokenizer files")
    else:
        model, tok = load_model(args.model, args.tokenizer, dtype=dtype, device=device)
    engine = Engine(model)
    ids = [tok(p).input_ids for p in args.prompt]
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else tok.eos_token_id
    single = len(ids) == 1
    shown = {"ids": [], "text": ""}

    def continuation(prompt_ids, new_ids) -> str:
        # decoded with the prompt: a SentencePiece piece's leading space is kept ("was" + "▁a" = "was a")
        return tok.decode(prompt_ids + new_ids, skip_special_tokens=True)[
            len(tok.decode(prompt_ids, skip_special_tokens=True)):]

    def stream(step, tokens):
        if tokens[0] in (eos if isinstance(eos, list) else [eos]):
            return
        shown["ids"].append(tokens[0])
        text = continuation(ids[0], shown["ids"])
        sys.stdout.write(text[len(shown["text"]):])
        sys.stdout.flush()
        shown["text"] = text

    if single:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    out = engine.generate(ids, args.max_new_tokens, sampling, eos_token_id=eos, stream=stream if single else None)
    if single:
        sys.stdout.write("\n")
    else:
        for prompt, prompt_ids, toks in zip(args.prompt, ids, out.tokens):
            print(prompt + continuation(prompt_ids, list(toks)))
            print()
    n = sum(len(t) for t in out.tokens)
    print(f"[{n} tokens; prefill {1e3 * out.prefill_s:.1f} ms, decode {out.decode_tokens_per_s:.1f} tokens/s "
          f"on {device}{', CUDA graphs' if out.cuda_graphs else ''}]", file=sys.stderr)
    return 0


def _add_bench(sub):
    p = sub.add_parser(
        "bench", help="end-to-end decode speed: tokens/s, latency, prefill, memory; fp16 vs GQSA side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time the decode engine on a checkpoint folder (settings 'gqsa' = as stored, 'fp16' = the "
                    "same weights dequantized to dense) or on a synthetic model of a named architecture with "
                    "random weights and a random row-balanced group mask, built directly on the device "
                    "(settings fp16, bf16, tinygemm, w{bits}s{sparsity%}g{G}). One untimed warm-up generation "
                    "per batch size, then --repeats timed ones (median).",
        epilog="examples:\n  gqsa bench --synthetic llama-2-7b --settings fp16,w4s50g16,w4s30g16 --batch 1,4,16 "
               "--json runs/bench.json\n  gqsa bench --synthetic llama-2-70b-layers=8\n"
               "  gqsa bench runs/stories260K-w4s50g16 --batch 1")
    p.add_argument("folder", nargs="?", help="GQSA checkpoint folder (or use --synthetic)")
    p.add_argument("--synthetic", metavar="ARCH",
                   help="llama-2-7b | llama-3-8b | llama-2-13b | llama-2-70b | tiny, optionally ARCH-layers=N")
    p.add_argument("--settings", default=None,
                   help="comma-separated; default fp16,w4s50g16,w4s30g16 (synthetic) or gqsa,fp16 (folder)")
    p.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes (default 1,4,16)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per batch size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: kernel-time breakdown of a decode step at the first batch size")
    p.add_argument("--no-compile", action="store_true", help="CUDA: eager pointwise ops (norm, RoPE, SiLU)")
    p.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up projections")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH (or to stdout instead of the table: --json alone)")
    _add_threads(p)
    p.set_defaults(func=cmd_bench)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated integers, e.g. 1,4,16; got '{text}'") from None
    if not values or min(values) < 1:
        raise CLIError(f"{flag} needs positive integers, got '{text}'")
    return values


def cmd_bench(args) -> int:
    from .engine import bench

    if (args.folder is None) == (args.synthetic is None):
        raise CLIError("give a checkpoint FOLDER or --synthetic ARCH (one of them)")
    if args.folder is not None and not _is_gqsa_folder(Path(args.folder)):
        if not Path(args.folder).exists():
            raise CLIError(f"{args.folder}: no such folder")
        raise CLIError(f"{args.folder} is not a GQSA checkpoint folder (config.json without quantization_config); "
                       f"compress it first, or use --synthetic ARCH")
    batches = _int_list(args.batch, "--batch")
    _apply_threads(args)
    for name in ("prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        raise CLIError("--new-tokens must be >= 2 (one prefill token and at least one decode step)")
    default = "gqsa,fp16" if args.folder else "fp16,w4s50g16,w4s30g16"
    settings = [s.strip() for s in (args.settings or default).split(",") if s.strip()]
    if not settings:
        raise CLIError("--settings is empty")
    if args.folder is None:
        from .engine.synthetic import arch_config, parse_setting

        arch_config(args.synthetic)  # unknown names fail here, before anything is built
        for s in settings:
            parse_setting(s)
    else:
        bad = [s for s in settings if s not in ("gqsa", "fp16")]
        if bad:
            raise CLIError(f"a checkpoint folder is benchmarked as 'gqsa' and/or 'fp16', not {bad[0]!r}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = bench.run(settings, batches, synthetic=args.synthetic, folder=args.folder, device=args.device,
                       prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed,
                       profile=args.profile, compile_ops=False if args.no_compile else "auto",
                       fuse=False if args.no_fuse else "auto", log=log)
    result["command"] = "gqsa " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(bench.format_table(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gqsa", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="GQSA: group quantization + group sparsity for LLMs. Compress a model into a packed "
                    "BSR checkpoint, evaluate it, inspect it.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"gqsa {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compress(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_report(sub)
    _add_generate(sub)
    _add_bench(sub)
    return p


def _device(name):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_compress(args) -> int:
    import torch

    from . import calib, distributed
    from .config import GQSAConfig
    from .models import load_model
    from .models.loader import stored_dtype

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} already exists; choose another --out or pass --overwrite")
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    config = _gqsa_config(args, GQSAConfig)
    _apply_threads(args, default=False)
    t0 = time.time()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, args.tokenizer, dtype=getattr(torch, args.dtype))
    source_dtype = stored_dtype(model)
    seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen) or args.seqlen)
    if args.calib == calib.SELF:
        print(f"sampling {args.nsamples} calibration windows of {seqlen} tokens from the model itself",
              file=sys.stderr, flush=True)
    tokens = calib.calibration_tokens(args.calib, tok, args.nsamples, seqlen, args.seed, model=model)
    if args.method != "gqsa":
        from .baselines import cli_compress  # writes its own folder and report

        return cli_compress(args, model, tok, tokens, _device(args.device))
    device = _device(args.device)
    if distributed.launched():  # torchrun: data-parallel trained stages, rank 0 writes
        if not config.trained:
            raise CLIError("--stages oneshot has nothing to split across processes; run it without torchrun")
        device = distributed.setup(args.device)
    try:
        return _compress_and_save(args, config, model, tok, tokens, seqlen, source_dtype, device, out, t0)
    finally:
        distributed.teardown()


def _compress_and_save(args, config, model, tok, tokens, seqlen, source_dtype, device, out, t0) -> int:
    import torch

    from . import checkpoint, distributed, report
    from .pipeline import compress_model

    workdir = out.with_name(out.name + ".partial")
    if config.trained and workdir.exists() and args.overwrite and not args.resume and distributed.is_main():
        import shutil

        shutil.rmtree(workdir)
    distributed.barrier()
    stats = {}
    packed = compress_model(model, config, tokens, device=device, batch_size=args.batch_size,
                            workdir=workdir if config.trained else None, resume=args.resume, stats=stats)
    if not distributed.is_main():
        return 0
    dense_dtype = source_dtype if args.dense_dtype == "auto" else getattr(torch, args.dense_dtype)
    model.to(dense_dtype)
    rep = report.compression_report(model, config, packed, stats, tokens, args.batch_size, device, time.time() - t0)
    rep["calibration"].update(source=str(args.calib), seed=args.seed)
    rep.update({
        "preset": args.preset,
        "resumed": bool(args.resume and any(b.get("resumed") for b in stats.get("bqpo", []))),
        "model": str(args.model), "tokenizer": str(args.tokenizer) if args.tokenizer else None,
        "world_size": distributed.world_size(),
        **({"simulated_ranks": distributed.simulated_ranks()} if distributed.simulated_ranks() > 1 else {}),
        "compute_dtype": args.dtype, "dense_dtype": str(dense_dtype),
    })
    checkpoint.save(model, out, tok, rep, overwrite=args.overwrite,
                    extra_quant_config={"sparsity": config.sparsity})
    if config.trained:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)  # the run is complete: its work folder is not needed
    t = rep["totals"]
    print(f"wrote {out}: {t['compressed_layers']} layers, sparsity {t['sparsity']:.3f}, "
          f"{t['bits_per_weight']:.3f} bits/weight, {rep['seconds']:.0f} s")
    return 0


def _gqsa_config(args, GQSAConfig):
    """The GQSAConfig of ``gqsa compress``: the preset, then every option given on the command line."""
    stage_options = ("val_fraction", "bqpo_epochs", "bqpo_batch_size", "bqpo_lr_weight", "bqpo_lr_scale",
                     "bqpo_lr_zero", "bqpo_patience", "bqpo_target", "e2e_epochs", "e2e_batch_size",
                     "e2e_grad_accum", "e2e_lr", "e2e_loss", "amp", "activation_dtype")
    given = {k: getattr(args, k) for k in stage_options if getattr(args, k, None) is not None}
    for flag in ("e2e_train_zero", "offload_activations"):
        if getattr(args, flag, False):
            given[flag] = True
    if getattr(args, "no_grad_checkpointing", False):
        given["e2e_grad_checkpointing"] = False
    for name in ("mask", "target_bits"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    if args.resume and args.stages == "oneshot":
        raise CLIError("--resume applies to the trained stages (--stages bqpo or bqpo+e2e)")
    return GQSAConfig.preset(args.preset, bits=args.bits, group_size=args.group_size, sparsity=args.sparsity,
                             saliency=args.saliency, allocation=args.allocation, quant_init=args.quant_init,
                             damp=args.damp, skip=args.skip, seed=args.seed, stages=args.stages, **given)


def cmd_eval(args) -> int:
    import torch

    from . import checkpoint
    from .eval.ppl import perplexity
    from .models import load_model

    device = _device(args.device)
    if not args.ppl and args.tasks is None and not args.kl_reference:
        raise CLIError("nothing to evaluate: pass --ppl TEXT, --tasks and/or --kl-reference MODEL")
    if args.kl_reference and not (args.kl_text or args.ppl):
        raise CLIError("--kl-reference needs a text: pass --kl-text TEXT (or --ppl TEXT)")
    _apply_threads(args)
    folder = Path(args.model)
    is_gqsa = _is_gqsa_folder(folder)
    if args.dtype == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    else:
        dtype = getattr(torch, args.dtype)
    if is_gqsa:
        model, tok = checkpoint.load(folder, device=device, dtype=dtype, verify=not args.no_verify)
        if tok is None:
            raise CLIError(f"{folder} has no tokenizer files")
    else:
        model, tok = load_model(args.model, args.tokenizer, dtype=dtype, device=device)
    results = []
    for text in args.ppl:
        r = perplexity(model, tok, text, context=args.context, batch_size=args.batch_size,
                       max_windows=args.max_windows)
        r["dtype"] = str(dtype)
        r["device"] = str(device)
        results.append(r)
        print(f"{text}: perplexity {r['ppl']:.3f} (context {r['context']}, {r['windows']} windows = "
              f"{r['evaluated_tokens']} tokens evaluated of the text's {r['tokens']}, {r['seconds']:.0f} s)")
    if args.tasks is not None:
        results.append(_eval_zeroshot(args, model, tok, dtype, device))
    if args.kl_reference:
        results.append(_eval_fidelity(args, model, tok, dtype, device))
    bad = [r.get("ppl") for r in results if "ppl" in r and not math.isfinite(r["ppl"])]
    if bad:  # not recorded either
        raise CLIError(f"perplexity is {bad[0]}: the model's outputs are not finite (damaged weights, or a dtype "
                       f"that overflows: try --dtype float32)")
    if folder.is_dir() and (folder / checkpoint.REPORT).is_file():
        path = folder / checkpoint.REPORT
        rep = checkpoint.read_json(path)
        if not isinstance(rep.setdefault("evaluations", []), list):
            raise CLIError(f"{path}: 'evaluations' is not a list; the report is damaged, results not recorded")
        rep["evaluations"].extend(results)
        checkpoint.write_json_atomic(path, rep)
    return 0


def _eval_zeroshot(args, model, tok, dtype, device) -> dict:
    if args.lm_eval:
        from .eval.lm_eval_adapter import DEFAULT_HARNESS_TASKS, run_lm_eval

        r = run_lm_eval(model, tok, args.tasks or DEFAULT_HARNESS_TASKS, limit=args.limit,
                        batch_size=args.zeroshot_batch_size)
    else:
        from .eval.zeroshot import DEFAULT_TASKS, evaluate_zeroshot

        r = evaluate_zeroshot(model, tok, args.tasks or DEFAULT_TASKS, tasks_dir=args.tasks_dir, limit=args.limit,
                     batch_size=args.zeroshot_batch_size)
    r.update(kind="zeroshot", dtype=str(dtype), device=str(device))
    for name, t in r["tasks"].items():
        extra = "".join(f", {m} {t[m]:.4f}" for m in ("acc_norm", "ppl") if m in t)
        print(f"{name}: acc {t.get('acc', float('nan')):.4f}{extra} ({t.get('n', '?')} documents)")
    print(f"zero-shot average acc: {r['avg_acc']:.4f} ({r['backend']}, limit {r['limit']})")
    return r


def _eval_fidelity(args, model, tok, dtype, device) -> dict:
    from .eval.fidelity import evaluate_fidelity
    from .models import load_model

    reference, _ = load_model(args.kl_reference, args.tokenizer if not _is_gqsa_folder(Path(args.model)) else None,
                              dtype=dtype, device=device)
    text = args.kl_text or args.ppl[0]
    windows = args.kl_windows if args.kl_windows is not None else args.max_windows
    r = evaluate_fidelity(model, reference, tok, text, context=args.context, batch_size=args.batch_size, max_windows=windows)
    r.update(kind="fidelity", reference=str(args.kl_reference), dtype=str(dtype), device=str(device))
    print(f"{text}: KL(reference || model) {r['kl']:.5f} nats/token, top-1 agreement {r['top1_agreement']:.4f} "
          f"({r['windows']} windows of {r['context']}, {r['seconds']:.0f} s)")
    return r


def _is_gqsa_folder(folder: Path) -> bool:
    """A folder whose config.json names a quantization method (a malformed one is refused by the
    GQSA loader with a precise message; a plain model folder goes to the ordinary loader)."""
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError, TypeError):  # the loaders say what is wrong with it
        return False


def cmd_inspect(args) -> int:
    from . import checkpoint, report

    packed = checkpoint.packed_layers(args.folder, verify=not args.no_verify)
    tensors = checkpoint.read_tensors(args.folder, verify=False)
    packed_names = {f"{n}.{t}" for n in packed for t in ("row_ptr", "col_idx", "qweight", "scales", "zeros", "bias")}
    dense = sum(t.numel() for n, t in tensors.items() if n not in packed_names)
    rows = report.layer_rows(packed)
    tot = report.totals(packed, dense, Path(args.folder))
    if args.json:
        print(json.dumps({"layers": rows, "totals": tot}, indent=2))
        return 0
    w = max(len(r["name"]) for r in rows)
    print(f"{'layer':<{w}}  {'shape':>12}  {'bits':>4}  {'G':>3}  {'sparsity':>8}  {'bytes':>10}  "
          f"{'bits/w':>7}  {'design':>7}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<{w}}  {shape:>12}  {r['bits']:>4}  {r['group_size']:>3}  {r['sparsity']:>8.3f}  "
              f"{r['bytes']:>10}  {r['bits_per_weight']:>7.3f}  {r['design_bits_per_weight']:>7.3f}")
    print(f"\ncompressed layers: {tot['compressed_layers']}, weights {tot['compressed_weights']:,}, "
          f"sparsity {tot['sparsity']:.3f}, {tot['bits_per_weight']:.3f} bits/weight "
          f"({tot['packed_bytes']:,} bytes vs {tot['fp16_bytes_of_compressed_layers']:,} in fp16)")
    print(f"whole model on disk: {tot['safetensors_bytes']:,} bytes = {tot['size_vs_fp16']:.3f} x fp16 "
          f"({tot['model_fp16_bytes']:,} bytes; dense tensors: {dense:,} values)")
    return 0


def main(argv=None) -> int:
    global _OWN_PROCESS
    if "torch" not in sys.modules:  # see gqsa.runtime: idle OpenMP threads sleep instead of spinning
        _OWN_PROCESS = True
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from .format import FormatError

    debug = os.environ.get("GQSA_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except (CLIError, FormatError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gqsa {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gqsa {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in gqsa (or a library): one line; GQSA_DEBUG=1 shows the traceback
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"gqsa {args.command}: internal error: {type(e).__name__}: {msg[:300]} (a bug? rerun with "
              f"GQSA_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
