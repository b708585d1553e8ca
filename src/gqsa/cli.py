"""The ``gqsa`` command line: ``compress``, ``eval``, ``inspect``."""
from __future__ import annotations

import argparse
import json
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
"""


METHODS = ("gqsa", "rtn", "gptq", "wanda", "sparsegpt", "magnitude")


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
    g.add_argument("--allocation", default="row", choices=("row", "layer"),
                   help="row: same kept-group count in every row; layer: ranked per layer (default row)")
    g.add_argument("--quant-init", default="mse", choices=("minmax", "mse"),
                   help="scale/zero init: min-max or clipping search (default mse)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diagonal")
    g.add_argument("--skip", nargs="*", default=[], metavar="SUFFIX",
                   help="module-name suffixes to leave dense, e.g. mlp.down_proj")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", required=True,
                   help="calibration text file, or a dataset name (wikitext2, c4, ptb) when online")
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
    p.add_argument("--ppl", required=True, nargs="+", metavar="TEXT",
                   help="text file(s), or dataset name(s) (wikitext2, ptb, c4) when online")
    p.add_argument("--context", type=int, default=None, help="window length (default min(2048, model max))")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the safetensors files")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gqsa", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="GQSA: group quantization + group sparsity for LLMs. Compress a model into a packed "
                    "BSR checkpoint, evaluate it, inspect it.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compress(sub)
    _add_eval(sub)
    _add_inspect(sub)
    return p


def _device(name):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_compress(args) -> int:
    import torch

    from . import calib, checkpoint, report
    from .compress import compress_model
    from .config import GQSAConfig
    from .models import load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} already exists; choose another --out or pass --overwrite")
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    config = GQSAConfig(bits=args.bits, group_size=args.group_size, sparsity=args.sparsity, saliency=args.saliency,
                        allocation=args.allocation, quant_init=args.quant_init, damp=args.damp, skip=args.skip,
                        seed=args.seed)
    t0 = time.time()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, args.tokenizer, dtype=getattr(torch, args.dtype))
    source_dtype = _source_dtype(model)
    seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen) or args.seqlen)
    tokens = calib.calibration_tokens(args.calib, tok, args.nsamples, seqlen, args.seed)
    if args.method != "gqsa":
        from .baselines import cli_compress  # writes its own folder and report

        return cli_compress(args, model, tok, tokens, _device(args.device))
    packed = compress_model(model, config, tokens, device=_device(args.device), batch_size=args.batch_size)
    dense_dtype = source_dtype if args.dense_dtype == "auto" else getattr(torch, args.dense_dtype)
    model.to(dense_dtype)
    dense_params = sum(p.numel() for p in model.parameters() if p.requires_grad or p.dim() > 0) - sum(
        m.bias.numel() for m in model.modules() if hasattr(m, "packed") and m.bias is not None)
    rep = {
        "method": "gqsa", "stage": "oneshot", "config": config.to_dict(),
        "model": str(args.model), "tokenizer": str(args.tokenizer) if args.tokenizer else None,
        "calibration": {"source": str(args.calib), "nsamples": args.nsamples, "seqlen": seqlen, "seed": args.seed},
        "device": str(_device(args.device)), "compute_dtype": args.dtype, "dense_dtype": str(dense_dtype),
        "seconds": round(time.time() - t0, 1), "environment": report.environment(),
        "layers": report.layer_rows(packed), "evaluations": [],
    }
    rep["totals"] = report.totals(packed, dense_params)
    checkpoint.save(model, out, tok, rep, overwrite=args.overwrite,
                    extra_quant_config={"sparsity": config.sparsity})
    t = rep["totals"]
    print(f"wrote {out}: {t['compressed_layers']} layers, sparsity {t['sparsity']:.3f}, "
          f"{t['bits_per_weight']:.3f} bits/weight, {rep['seconds']:.0f} s")
    return 0


def _source_dtype(model):
    import torch

    d = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def cmd_eval(args) -> int:
    import torch

    from . import checkpoint
    from .eval.ppl import perplexity
    from .models import load_model

    device = _device(args.device)
    folder = Path(args.model)
    is_gqsa = _is_gqsa_folder(folder)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
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
        print(f"{text}: perplexity {r['ppl']:.3f} (context {r['context']}, {r['windows']} windows, "
              f"{r['tokens']} tokens, {r['seconds']:.0f} s)")
    if folder.is_dir() and (folder / checkpoint.REPORT).is_file():
        path = folder / checkpoint.REPORT
        rep = json.loads(path.read_text())
        rep.setdefault("evaluations", []).extend(results)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rep, indent=2))
        os.replace(tmp, path)
    return 0


def _is_gqsa_folder(folder: Path) -> bool:
    """A folder whose config.json names a quantization method (a malformed one is refused by the
    GQSA loader with a precise message; a plain model folder goes to the ordinary loader)."""
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
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
    from .format import FormatError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, FormatError, FileNotFoundError, FileExistsError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"gqsa {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gqsa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
