"""Fidelity of a compressed model to its uncompressed reference on held-out text: the mean per-token
``KL(reference ‖ compressed)`` of the next-token distributions and the top-1 agreement (how often
both models' most likely next token is the same), over the GPTQ-protocol windows of a text."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .ppl import text_windows, window_length


def check_vocabularies(model, reference) -> None:
    """``ValueError`` unless the two models predict the same number of tokens (a quantized output layer, which has
    no dense weight, is taken to match)."""
    v_ref = reference.get_output_embeddings().weight.shape[0]
    v_cmp = model.get_output_embeddings()
    v_cmp = v_cmp.weight.shape[0] if hasattr(v_cmp, "weight") else v_ref
    if v_ref != v_cmp:
        raise ValueError(f"the reference has {v_ref} output tokens and the model {v_cmp}: they must share a vocabulary")


@torch.no_grad()
def evaluate_fidelity(model, reference, tokenizer, source: str, context: int | None = None, batch_size: int = 4,
             max_windows: int | None = None, progress: bool = True) -> dict:
    """``{"kl", "top1_agreement", "ppl", "ppl_reference", "tokens", "windows", …}`` on the first
    ``max_windows`` non-overlapping ``context``-token windows of ``source`` (all when None).

    KL is in nats per token, over every position of every window (including each window's last
    position, which has no label); the two perplexities are over the same windows. Both models
    must share the tokenizer; each runs on its own device.
    """
    t0 = time.perf_counter()
    context = min(window_length(model, context), window_length(reference, context))
    check_vocabularies(model, reference)
    _, windows = text_windows(source, tokenizer, context, max_windows)
    n = windows.shape[0]
    dev_m = next(model.parameters()).device
    dev_r = next(reference.parameters()).device
    kl_sum = agree = 0.0
    nll = nll_ref = 0.0
    for batch in tqdm(windows.split(batch_size), desc="fidelity", unit="batch", disable=not progress):
        lr = torch.log_softmax(reference(batch.to(dev_r), use_cache=False).logits.float(), -1)
        lm = torch.log_softmax(model(batch.to(dev_m), use_cache=False).logits.float(), -1).to(lr.device)
        kl_sum += (lr.exp() * (lr - lm)).sum(-1).double().sum().item()
        agree += (lr.argmax(-1) == lm.argmax(-1)).sum().item()
        target = batch[:, 1:].to(lr.device)
        nll += -lm[:, :-1].gather(-1, target[..., None]).double().sum().item()
        nll_ref += -lr[:, :-1].gather(-1, target[..., None]).double().sum().item()
    positions = n * context
    return {
        "kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "ppl": math.exp(nll / (n * (context - 1))),
        "ppl_reference": math.exp(nll_ref / (n * (context - 1))),
        "text": str(source),
        "context": context,
        "windows": n,
        "tokens": positions,
        "seconds": round(time.perf_counter() - t0, 2),
    }
