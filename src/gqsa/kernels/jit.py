"""Triton's compile mode for the package's kernels: the interpreter or the compiler, chosen by
``TRITON_INTERPRET`` when a kernel is launched (so tests can switch it per test), and the one cache of
jitted kernels every launcher takes its kernels from. Kernels are plain Python functions until then."""
from __future__ import annotations

import os

try:  # triton is optional: without it the launchers fall back to the reference
    import triton
except Exception:  # pragma: no cover - depends on the environment
    triton = None

_JITTED: dict = {}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def jitted(fn, do_not_specialize: tuple = ()):
    """``fn`` (a plain-python kernel) jitted for the current mode (interpreter or compiled), made on
    first use and kept per (kernel, mode): every launcher of the package gets its kernels here."""
    key = (fn, _interpret())
    k = _JITTED.get(key)
    if k is None:
        k = _JITTED[key] = triton.jit(fn, do_not_specialize=list(do_not_specialize))
    return k
