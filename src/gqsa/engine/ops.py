"""Pointwise pieces of a LLaMA block, written as plain functions so that ``torch.compile`` can fuse
each into one kernel on the GPU (the decode step is launch-bound outside the linears: an eager
RMSNorm alone is ~6 kernels). The math is that of transformers' ``LlamaRMSNorm``,
``apply_rotary_pos_emb`` and ``LlamaMLP`` (SiLU gate); the engine uses transformers' own modules
unless it is asked to compile (see :class:`gqsa.engine.llama.LlamaDecoder`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(x + delta, rms_norm(x + delta))``: the residual add and the next norm in one kernel."""
    s = x + delta
    return s, rms_norm(s, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q ``[B, H, T, D]``, k ``[B, Hkv, T, D]``, cos/sin ``[B, T, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` for ``gate_up = [g | u]`` along the last dimension."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


_COMPILED: dict = {}


RECOMPILE_LIMIT = 64  # each function is specialized per dtype and per size-1 dims: 8 (torch's default) is too few


def compiled(name: str):
    """The ``torch.compile``d version of one of the functions above (made once per process). If
    compilation fails, the function runs eagerly from then on (same math), with a warning."""
    fn = _COMPILED.get(name)
    if fn is None:
        import torch._dynamo

        if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        comp = torch.compile(globals()[name], dynamic=True, fullgraph=True)
        eager = globals()[name]

        def fn(*args, _state={"ok": True}):
            if _state["ok"]:
                try:
                    return comp(*args)
                except Exception as e:  # noqa: BLE001 - fall back to the same math, eagerly
                    import warnings

                    warnings.warn(f"torch.compile of gqsa.engine.ops.{name} failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly")
                    _state["ok"] = False
            return eager(*args)

        _COMPILED[name] = fn
    return fn
