"""Perplexity by the GPTQ protocol: the whole text tokenized once (one BOS at the start), cut into
non-overlapping windows of ``context`` tokens (the tail shorter than a window is dropped), the mean
token NLL over all windows, ``exp``."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .. import calib


def model_context(model, cap: int = 2048) -> int:
    """``min(cap, the model's maximum context)``."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or cap
    return min(cap, int(limit))


def window_length(model, context: int | None) -> int:
    """``context``, or :func:`model_context` when None; ``ValueError`` when it is not positive or longer than
    the model's maximum context (positions it was not made for: an extrapolation, and attention quadratic in a
    window that long)."""
    if context is None:
        return model_context(model)
    limit = model_context(model, cap=1 << 62)
    if context < 1 or context > limit:
        raise ValueError(f"--context {context}: use 1 to {limit}, the model's maximum context")
    return context


def text_windows(source: str, tokenizer, context: int, max_windows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(all token ids of ``source``, its first ``max_windows`` non-overlapping ``[n, context]`` windows)."""
    ids = calib.tokenize(calib.read_text(source, purpose="evaluation"), tokenizer, str(source))
    n = ids.numel() // context
    if n == 0:
        raise ValueError(f"{source}: {ids.numel()} tokens are fewer than one window of {context}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids, ids[: n * context].reshape(n, context)


@torch.no_grad()
def perplexity(model, tokenizer, source: str, context: int | None = None, batch_size: int = 4,
               device=None, progress: bool = True, max_windows: int | None = None) -> dict:
    """Perplexity of ``model`` on a text file or dataset name; returns a dict with ``ppl``, the text,
    context, the text's token count (``tokens``), the evaluated ones (``evaluated_tokens``, ``windows ×
    context``), the window count, and seconds. ``max_windows`` evaluates only the first windows
    (quick checks; the count is in the result)."""
    t0 = time.perf_counter()
    context = window_length(model, context)
    ids, windows = text_windows(source, tokenizer, context, max_windows)
    n = windows.shape[0]
    device = device or next(model.parameters()).device
    total = 0.0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        logits = model(batch.to(device), use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1).to(device), reduction="none"
        ).reshape(batch.shape[0], -1)
        total += nll.mean(1).double().sum().item()
    return {
        "ppl": math.exp(total / n),
        "text": str(source),
        "context": context,
        "tokens": int(ids.numel()),  # of the whole text
        "evaluated_tokens": n * context,  # in the windows evaluated (max_windows)
        "windows": n,
        "seconds": round(time.perf_counter() - t0, 2),
    }
