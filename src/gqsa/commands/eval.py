"""``gqsa eval``: perplexity, zero-shot tasks and fidelity of a checkpoint (or of an uncompressed model),
printed and recorded in the folder's report; the measurements are :mod:`gqsa.eval`'s."""
from __future__ import annotations

import math
from pathlib import Path

from . import common
from .common import CLIError, add_threads


def add_parser(sub):
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
    add_threads(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..sources import check_model_source, check_text_source

    # what needs no torch first: a mistyped path or option fails at once, not after the imports
    for name in ("max_windows", "batch_size", "limit", "zeroshot_batch_size", "kl_windows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.ppl and args.tasks is None and not args.kl_reference:
        raise CLIError("nothing to evaluate: pass --ppl TEXT, --tasks and/or --kl-reference MODEL")
    if args.kl_reference and not (args.kl_text or args.ppl):
        raise CLIError("--kl-reference needs a text: pass --kl-text TEXT (or --ppl TEXT)")
    check_model_source(args.model)
    if args.kl_reference:
        check_model_source(args.kl_reference)
    for text in [*args.ppl, *([args.kl_text] if args.kl_text else [])]:
        check_text_source(text)

    import torch

    from .. import checkpoint
    from ..eval.ppl import perplexity
    from ..models.loader import load_any

    device = common.device(args.device)
    common.apply_threads(args)
    folder = Path(args.model)
    if args.dtype == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.float16
    else:
        dtype = getattr(torch, args.dtype)
    model, tok = load_any(args.model, args.tokenizer, dtype=dtype, device=device, verify=not args.no_verify)
    # the KL reference before any evaluation: a wrong one is refused before minutes of perplexity are spent
    reference = _load_reference(args, model, dtype, device) if args.kl_reference else None
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
    if reference is not None:
        results.append(_eval_fidelity(args, model, reference, tok, dtype, device))
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
        from ..eval.lm_eval_adapter import DEFAULT_HARNESS_TASKS, run_lm_eval

        r = run_lm_eval(model, tok, args.tasks or DEFAULT_HARNESS_TASKS, limit=args.limit,
                        batch_size=args.zeroshot_batch_size)
    else:
        from ..eval.zeroshot import DEFAULT_TASKS, evaluate_zeroshot

        r = evaluate_zeroshot(model, tok, args.tasks or DEFAULT_TASKS, tasks_dir=args.tasks_dir, limit=args.limit,
                     batch_size=args.zeroshot_batch_size)
    r.update(kind="zeroshot", dtype=str(dtype), device=str(device))
    for name, t in r["tasks"].items():
        extra = "".join(f", {m} {t[m]:.4f}" for m in ("acc_norm", "ppl") if m in t)
        print(f"{name}: acc {t.get('acc', float('nan')):.4f}{extra} ({t.get('n', '?')} documents)")
    print(f"zero-shot average acc: {r['avg_acc']:.4f} ({r['backend']}, limit {r['limit']})")
    return r


def _load_reference(args, model, dtype, device):
    """The uncompressed model of ``--kl-reference``, checked to share the model's vocabulary."""
    from .. import checkpoint
    from ..eval.fidelity import check_vocabularies
    from ..models import load_model

    reference, _ = load_model(args.kl_reference, args.tokenizer if not checkpoint.is_gqsa_folder(args.model) else None,
                              dtype=dtype, device=device)
    check_vocabularies(model, reference)
    return reference


def _eval_fidelity(args, model, reference, tok, dtype, device) -> dict:
    from ..eval.fidelity import evaluate_fidelity

    text = args.kl_text or args.ppl[0]
    windows = args.kl_windows if args.kl_windows is not None else args.max_windows
    r = evaluate_fidelity(model, reference, tok, text, context=args.context, batch_size=args.batch_size, max_windows=windows)
    r.update(kind="fidelity", reference=str(args.kl_reference), dtype=str(dtype), device=str(device))
    print(f"{text}: KL(reference || model) {r['kl']:.5f} nats/token, top-1 agreement {r['top1_agreement']:.4f} "
          f"({r['windows']} windows of {r['context']}, {r['seconds']:.0f} s)")
    return r


