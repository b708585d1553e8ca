"""``gqsa compress``: its arguments, turned into a call of :func:`gqsa.workflow.compress_to_folder`."""
from __future__ import annotations

import argparse

from .common import COMPRESS_THREADS_HELP, apply_threads

METHODS = ("gqsa", "rtn", "gptq", "wanda", "sparsegpt", "magnitude")
ALLOCATIONS = ("row", "layer", "block16", "block32", "block64", "block128", "cluster16", "cluster32", "cluster64", "cluster128")  # gqsa.config.ALLOCATIONS (torch-free here)
_NOT_OPTIONS = ("func", "command", "threads", "model", "out", "no_grad_checkpointing")


def add_parser(sub, epilog: str):
    p = sub.add_parser(
        "compress", help="compress a model with GQSA and write a packed checkpoint folder",
        description="Group-prune and group-quantize every linear of a model's decoder blocks, calibrated "
                    "block by block on text, and write a packed BSR checkpoint folder (atomically).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p) -> None:
    p.add_argument("model", help="Hugging Face model id or folder, or a llama2.c .bin checkpoint")
    p.add_argument("--tokenizer", help="tokenizer (llama2.c tok*.bin, SentencePiece .model, folder or hub id); "
                                       "default: the model's own, or the tok*.bin beside a llama2.c file")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--method", default="gqsa", choices=METHODS,
                   help="gqsa (default), or a baseline for side-by-side comparisons")
    g = p.add_argument_group("GQSA settings")
    g.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="weight bits (default 4); 3-bit layers run on the GPU through "
                   "the 4-bit kernels, their codes widened in GPU memory")
    g.add_argument("--group-size", type=int, default=16, choices=(16, 32, 64, 128),
                   help="group width G: one pruning unit = one quantization group (default 16)")
    g.add_argument("--sparsity", type=float, default=0.5, help="fraction of groups removed (default 0.5)")
    g.add_argument("--saliency", default="hessian", choices=("magnitude", "wanda", "hessian"),
                   help="group ranking; hessian also compensates the kept weights (default hessian)")
    g.add_argument("--allocation", default="row", choices=ALLOCATIONS,
                   help="row: same kept-group count in every row (best accuracy); layer: "
                        "ranked per layer; blockR: the same kept columns in every R consecutive rows, and clusterR: "
                        "the same in clusters of R rows chosen to keep the most — both feed the block kernels, "
                        "faster than row from batch 2 on (a GPU), at an accuracy cost that grows with R and "
                        "with the sparsity (for batch serving, e.g. cluster64 with --sparsity 0.3 --group-size 64: "
                        "README, benchmarks/RESULTS.md) (default row)")
    g.add_argument("--quant-init", default="mse", choices=("minmax", "mse"),
                   help="scale/zero init: min-max or clipping search (default mse)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diagonal")
    g.add_argument("--mask", default=None, metavar="METHOD",
                   help="group mask with hessian saliency: fixed (ranked once), cgN (fixed, then N conjugate-gradient steps of "
                        "a least-squares re-fit of the kept groups), qcgN (cgN, groups ranked by what keeping them saves once quantized), rerankN (N rounds of rank, prune, re-fit), iterN "
                        "(N rounds with an exact re-fit) or adaptive[B] (per B groups during the sweep) "
                        "(default: gqsa.config's)")
    g.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="choose each linear's sparsity (row-balanced) so the compressed linears take at most B "
                        "bits/weight at the least measured error; replaces --sparsity")
    g.add_argument("--skip", nargs="*", default=[], metavar="SUFFIX",
                   help="module-name suffixes to leave dense, e.g. mlp.down_proj")
    g.add_argument("--quantize-lm-head", type=int, choices=(4, 8), default=None, metavar="BITS",  # config.LM_HEAD_BITS
                   help="also quantize the output layer to 4 or 8 bits (GPTQ, groups of 128, no sparsity; a tied "
                        "one is untied, the input embedding stays dense). Measured on a 7B synthetic model, H200: 4 bits "
                        "made batch-1 decoding 2.8%% faster, 8 bits did not change it (8-bit layers take the older GEMV); "
                        "accuracy cost 4 bits +0.7–2.3%% perplexity, 8 bits none. Default: a dense output layer")
    t = p.add_argument_group(
        "GQSA training stages",
        "BQPO trains each block's latent weights and s, z through fake quantization (mask held) to match the "
        "uncompressed block; E2E-OQP then trains the scales (and, --e2e-lr-codes, the kept codes) end to end, "
        "mask frozen, by distillation from the uncompressed model. Unset "
        "options take the --preset's value (see gqsa.config.PRESETS); all are recorded in gqsa_report.json")
    t.add_argument("--stages", default="bqpo+e2e", choices=("oneshot", "bqpo", "bqpo+e2e"),
                   help="oneshot: no training; bqpo: block-wise; bqpo+e2e: then end to end (default)")
    t.add_argument("--preset", default="default", choices=("default", "fast"),
                   help="fast: ~4x fewer epochs (CPU runs of small models, quick checks)")
    t.add_argument("--resume", action="store_true",
                   help="continue a killed run from its work folder <out>.partial (same settings and data); "
                        "the result is bitwise that of an uninterrupted run")
    t.add_argument("--val-fraction", type=float, help="calibration windows held out for early stopping "
                                                      "and best-epoch selection, drawn from that last fraction of "
                                                      "the text, which no training window covers (default 0.1)")
    t.add_argument("--bqpo-epochs", type=int, help="BQPO epochs per block (default 20; fast: 5)")
    t.add_argument("--bqpo-batch-size", type=int, help="BQPO windows per step (default 4, and 4 per 512 "
                   "calibration windows from 1024 windows on, up to 16: more windows in about the same time)")
    t.add_argument("--bqpo-lr-weight", type=float,
                   help="BQPO AdamW lr of the latent weights, in quantization steps per update (default 0.1)")
    t.add_argument("--bqpo-lr-scale", type=float, help="BQPO lr of the scales, relative (default 0.03)")
    t.add_argument("--bqpo-lr-zero", type=float, help="BQPO lr of the zero points, in codes (default 0.1)")
    t.add_argument("--bqpo-patience", type=int, help="BQPO: stop a block after this many epochs without a "
                                                     "better held-out loss (default 4; fast: 2)")
    t.add_argument("--bqpo-gradual", type=int, metavar="E",
                   help="BQPO: start dense and reach --sparsity over the first E epochs, re-choosing the mask from "
                        "the trained weights after each (default 0: the one-shot mask, frozen)")
    t.add_argument("--bqpo-learn-mask", type=int, metavar="E",
                   help="BQPO: learn the group mask during the first E epochs (scores per row and group, hard "
                        "top-k at the target sparsity, straight-through gradient), frozen after (default 0: the "
                        "one-shot mask, frozen)")
    t.add_argument("--bqpo-lr-mask", type=float, help="BQPO lr of those mask scores (default 0.05)")
    t.add_argument("--bqpo-target", choices=("fp", "qinput"),
                   help="fp: uncompressed block on uncompressed inputs (default); qinput: uncompressed block "
                        "on the compressed model's inputs")
    t.add_argument("--e2e-epochs", type=int, help="E2E-OQP epochs (default 5; fast: 2)")
    t.add_argument("--e2e-batch-size", type=int, help="E2E-OQP windows per micro-batch (default: as "
                   "--bqpo-batch-size's)")
    t.add_argument("--e2e-grad-accum", type=int, help="E2E-OQP micro-batches per optimizer step (default 1)")
    t.add_argument("--e2e-lr", type=float, help="E2E-OQP lr of the scales, relative (default 1e-2 with "
                   "--e2e-loss kd, 1e-3 with lm)")
    t.add_argument("--e2e-lr-codes", type=float,
                   help="E2E-OQP lr of the kept weights' codes (code units per step, rounded straight-through; the "
                        "mask stays frozen): end-to-end quantization-aware training, 16 bytes of device memory per "
                        "kept weight; 0 freezes them. Default: 0.1 when E2E-OQP distils (--e2e-loss kd) over at "
                        "least 500 optimizer steps (5 epochs of 512 or more calibration windows) on sparse layers of "
                        "4+ bits, else 0; the plan line says which. 0.1 gained 5-9%% perplexity at 580 steps (W4 "
                        "S50/S30), lost or tied at 58-290, and lost on W3 S0 G128")
    t.add_argument("--e2e-loss", choices=("lm", "kd"),
                   help="E2E-OQP objective: kd = KL to the uncompressed model (default; holds a copy of it); "
                        "lm = causal-LM loss on the calibration text (no copy)")
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
    c.add_argument("--nsamples", type=int, default=128,
                   help="calibration windows (default 128); sparse settings gain from more: on gutenberg-llama-22m "
                        "W4 S50 G16 went from 86.4 perplexity (128) to 76.6 (512), 73.8 (1024) and 72.4 (2048); "
                        "from 1024 on the training steps grow with the windows (--bqpo-batch-size), so 1024 train in "
                        "about the time of 512")
    c.add_argument("--seqlen", type=int, default=None,
                   help="tokens per window (default 2048, or the model's context if shorter; a longer --seqlen than "
                        "the context is capped to it with a warning)")
    c.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    c.add_argument("--seed", type=int, default=0, help="seed of the window sampling (default 0)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="where blocks are compressed (default: cuda if present, else cpu)")
    r.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="compute dtype of the model while compressing (default float32)")
    r.add_argument("--dense-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="storage dtype of the dense tensors (embeddings, norms, lm_head); "
                        "auto = the source checkpoint's (default)")


def options(args) -> dict:
    """The keyword arguments of :func:`gqsa.workflow.compress_to_folder` that ``args`` holds (all but the
    model and ``out``)."""
    kw = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    if "no_grad_checkpointing" in vars(args):
        kw["grad_checkpointing"] = not args.no_grad_checkpointing
    return kw


_UNSET = object()


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose errors are a ``ValueError`` with argparse's message (not a usage text and an exit)."""

    def error(self, message):
        raise ValueError(message)


def given_options(argv: list[str]) -> dict:
    """The options ``gqsa compress`` arguments ``argv`` give (the model and --out apart), as keyword
    arguments of :func:`gqsa.workflow.compress_to_folder`; ``ValueError`` (saying why) when they do not parse."""
    parser = _RaisingParser(prog="gqsa compress", add_help=False)
    add_arguments(parser)
    base = ["\0MODEL", "--calib", "\0CALIB", "--out", "\0OUT"]  # (a --calib in argv wins, as on a command line)
    try:
        full = parser.parse_args([*base, *argv])
        given = parser.parse_args([*base, *argv], namespace=argparse.Namespace(**{k: _UNSET for k in vars(full)}))
    except ValueError as e:
        raise ValueError(f"not gqsa compress arguments ({e}): {' '.join(argv)}") from None
    return options(argparse.Namespace(**{k: getattr(full, k) for k, v in vars(given).items()
                                         if v is not _UNSET and not (k == "calib" and v == "\0CALIB")}))


def run(args) -> int:
    from ..workflow import compress_to_folder, work_folder  # (torch-free until its argument checks have passed)

    try:
        return compress_to_folder(args.model, args.out, **options(args),
                                  before_load=lambda: apply_threads(args, default=False))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_hint(work_folder(args.out))) from None


def resume_hint(work) -> str:
    """What an interrupted run left to resume from: its finished blocks in its work folder ``work`` (or nothing)."""
    from ..stages.workdir import finished_blocks

    n = finished_blocks(work)
    if not n:
        return ""
    return (f"{n} finished block{'s' if n > 1 else ''} kept in {work}: the same command with --resume continues "
            "from there")
