"""The ``gqsa`` command line: one module per command (``compress``, ``eval``, ``inspect``, ``report``,
``generate``, ``bench``), each turning its arguments into calls of plain library functions; here the parser
of them all and :func:`main` (one-line errors, exit status 2)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import bench, compress, eval, generate, inspect, report
from .common import OWN_PROCESS, CLIError

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



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gqsa", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="GQSA: group quantization + group sparsity for LLMs. Compress a model into a packed "
                    "BSR checkpoint, evaluate it, inspect it.")
    from .. import __version__

    p.add_argument("--version", action="version", version=f"gqsa {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compress.add_parser(sub, EPILOG)
    eval.add_parser(sub)
    inspect.add_parser(sub)
    report.add_parser(sub)
    generate.add_parser(sub)
    bench.add_parser(sub)
    return p


def _one_line_warning(command: str, show):
    """A ``warnings.showwarning`` printing warnings raised in gqsa's own code as ``gqsa COMMAND: warning: MESSAGE``
    on stderr; other libraries' warnings go to ``show`` as before."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package + os.sep):
            print(f"gqsa {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def _close_progress_bars() -> None:
    """Close the progress bars a failed or interrupted command left open, so that its message is a line of its
    own (not glued to the end of a bar)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def main(argv=None) -> int:
    if "torch" not in sys.modules:  # see gqsa.runtime: idle OpenMP threads sleep instead of spinning
        OWN_PROCESS["value"] = True
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    debug = os.environ.get("GQSA_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings():  # gqsa's own warnings as one line each (GQSA_DEBUG=1: Python's format)
            if not debug:
                warnings.showwarning = _one_line_warning(args.command, warnings.showwarning)
            if getattr(args, "threads", None) is not None and args.threads <= 0:  # (before any command's imports)
                raise CLIError("--threads must be positive")
            return args.func(args)
    except (CLIError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:  # (gqsa.FormatError: a ValueError)
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _close_progress_bars()
        print(f"gqsa {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # (a command may say what was kept: compress's finished blocks)
        _close_progress_bars()
        print(f"gqsa {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except Exception as e:  # a bug in gqsa (or a library): one line; GQSA_DEBUG=1 shows the traceback
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _close_progress_bars()
        print(f"gqsa {args.command}: internal error: {type(e).__name__}: {msg[:300]} (a bug? rerun with "
              f"GQSA_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 2


__all__ = ["CLIError", "build_parser", "main"]
