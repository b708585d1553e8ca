"""CPU threads of torch for the commands that compute (``--threads``; default :func:`default_threads`).

torch's own default is one thread per core. On a machine where other processes are computing, its
OpenMP threads then wait for cores they do not get, at every operation: small models ran up to 77×
slower than on one thread (``gqsa generate`` on stories260K, 2 cores, other work running). The
default here takes the cores that are free now — the CPUs this process may run on, minus the
1-minute load average (the work of the other processes; we have not started), at least 1 — and
``GQSA_THREADS`` overrides it. The ``gqsa`` command also sets ``OMP_WAIT_POLICY=PASSIVE`` (unless
given) before torch is loaded, so that idle OpenMP threads sleep instead of spinning: with 2 threads
on that busy machine ``gqsa generate`` went from 3.7 to 535.6 tokens/s (``benchmarks/RESULTS.md``).
``compress`` keeps torch's own count unless ``--threads`` is given (a rerun or ``--resume`` then
computes with the same thread count, hence the same rounding).
"""
from __future__ import annotations

import os


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """``$GQSA_THREADS``, else the free cores now: ``max(1, CPUs − round(1-minute load average))``."""
    env = os.environ.get("GQSA_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"GQSA_THREADS must be a positive integer, got '{env}'") from None
        if n <= 0:
            raise ValueError(f"GQSA_THREADS must be a positive integer, got '{env}'")
        return n
    cpus = available_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cpus, cpus - round(busy)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default :func:`default_threads`); returns the count."""
    import torch

    if threads is not None and threads <= 0:
        raise ValueError("--threads must be positive")
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    return n
