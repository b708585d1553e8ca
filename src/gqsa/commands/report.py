"""``gqsa report``: its arguments, and rows given as ``gqsa compress`` arguments, turned into a call of
:func:`gqsa.report_matrix.run_report` whose rows carry keyword arguments of the library's compress."""
from __future__ import annotations

import argparse
import shlex
import sys

from . import common
from .common import CLIError, add_threads
from .compress import given_options


def add_parser(sub):
    p = sub.add_parser(
        "report", help="GQSA and the baselines side by side: perplexity, zero-shot, KL, bits/weight, size",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a matrix of `gqsa compress` settings on one model (default: fp16; GQSA W4 S30/S50/S70 "
                    "at G16 and G32; SparseGPT, Wanda and magnitude 2:4; SparseGPT 4:8; SparseGPT 2:4 and 4:8 "
                    "with int4 values g128; GQSA W3 S0 G128; GPTQ W2/W3/W4 g128; RTN W4 g128), "
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
    p.add_argument("--gqsa-args", default="", help="further `gqsa compress` arguments for every GQSA row (one string, "
                   "given with '=' since it starts with a dash: --gqsa-args='--mask rerank4')")
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
    add_threads(p)
    p.set_defaults(func=run)


def parse_row(spec: str):
    """``NAME=ARGS`` (ARGS: ``gqsa compress`` arguments) → a :class:`gqsa.report_matrix.Row`; the method decides
    the family."""
    from ..report_matrix import Row, family_of, label

    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ValueError(f"row '{spec}' is not NAME=ARGS (e.g. 'gqsa-w4s50g16-bqpo=--method gqsa --stages bqpo')")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"row name '{name}' may hold only letters, digits, '-', '_' and '.'")
    args = shlex.split(rest)
    _refuse_out(args, f"row {name}")
    try:
        options = given_options(args)
    except ValueError as e:  # (before any row runs: a typo in the last row would waste the hours of the others)
        raise ValueError(f"row {name}: {e}") from None
    return Row(name, label(options) or name, args, family_of(args), options)


def _refuse_out(args: list[str], who: str) -> None:
    if any(a == "--out" or a.startswith("--out=") for a in args):
        raise ValueError(f"{who}: --out is the report's to choose (it writes OUT/checkpoints/NAME); leave it out")


def auto_label(args: list[str]) -> str | None:
    """A table label from ``gqsa compress`` arguments (None when they do not parse)."""
    from ..report_matrix import label

    try:
        return label(given_options(args))
    except ValueError:
        return None


def row_args(row, gqsa_stage: str = "oneshot", gqsa_args: list[str] | None = None):
    """``row`` with the GQSA stage and the further ``gqsa compress`` arguments of every GQSA row applied
    (its ``args`` and its keyword ``options``)."""
    from ..report_matrix import Row, with_stage

    row = with_stage(row, gqsa_stage)
    if row.family != "gqsa" or not gqsa_args:
        return row
    _refuse_out(list(gqsa_args), "--gqsa-args")
    args = row.args + list(gqsa_args)
    try:
        return Row(row.name, row.label, args, row.family, given_options(args))
    except ValueError as e:
        raise ValueError(f"--gqsa-args, row {row.name}: {e}") from None


def rows_from_cli(only: list[str] | None, extra: list[str] | None, gqsa_stage: str = "oneshot",
                  gqsa_args: list[str] | None = None):
    """The default rows (``only`` those, by name) and the ``extra`` ``NAME=ARGS`` ones, with the stage and
    the further GQSA arguments applied."""
    from ..report_matrix import default_rows

    rows = default_rows()
    if only:
        known = {r.name: r for r in rows}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"unknown row(s) {', '.join(unknown)}; default rows: {', '.join(known)}")
        rows = [known[n] for n in only]
    rows += [parse_row(spec) for spec in extra or []]
    return [row_args(r, gqsa_stage, gqsa_args) for r in rows]


def run(args) -> int:
    from ..sources import SELF, check_model_source, check_text_source

    check_model_source(args.model)  # (before torch is imported: a mistyped path fails at once)
    if args.calib != SELF:
        check_text_source(args.calib)
    check_text_source(args.eval_text)
    from ..report_matrix import run_report

    for name in ("nsamples", "batch_size"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    if args.max_windows is not None and args.max_windows < 1:
        raise CLIError("--max-windows must be >= 1")
    for name in ("limit", "kl_windows"):  # 0: all documents / no KL
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0")
    rows = rows_from_cli(args.rows, args.add_row, args.gqsa_stage, shlex.split(args.gqsa_args))
    common.apply_threads(args)
    command = "gqsa " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["report"] else None
    run_report(args.model, args.calib, args.eval_text, args.out, tokenizer=args.tokenizer, rows=rows,
               context=args.context, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
               eval_batch_size=args.batch_size, tasks=args.tasks, tasks_dir=args.tasks_dir,
               limit=args.limit or None, kl_windows=args.kl_windows, max_windows=args.max_windows,
               device=args.device, gqsa_stage=args.gqsa_stage, keep_checkpoints=args.keep_checkpoints,
               command=command)
    return 0
