"""What every ``gqsa`` command shares: the one-line error, ``--threads``, the default device."""
from __future__ import annotations

import argparse  # noqa: F401  (the commands build their parsers with it)

THREADS_HELP = ("CPU threads of torch (default: the cores free now — CPUs minus the 1-minute load average, at "
                "least 1 — or $GQSA_THREADS)")
COMPRESS_THREADS_HELP = ("CPU threads of torch (default: torch's own, one per core, so that a rerun or --resume "
                         "computes the same; idle threads sleep instead of spinning, OMP_WAIT_POLICY=PASSIVE)")
OWN_PROCESS = {"value": False}  # main() runs in a process of its own (torch not imported before): it picks the threads


class CLIError(Exception):
    """An error of the user's input: printed as one line, exit status 2."""


def add_threads(p):
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def apply_threads(args, default: bool = True):
    """``--threads``, else (``default``, in the ``gqsa`` process itself) :func:`gqsa.runtime.default_threads`;
    a Python caller's own torch setting is left alone."""
    from ..runtime import set_threads

    if args.threads is not None and args.threads <= 0:
        raise CLIError("--threads must be positive")
    if args.threads is not None or (default and OWN_PROCESS["value"]):
        set_threads(args.threads)


def device(name):
    from ..modules import default_device

    return default_device(name)
