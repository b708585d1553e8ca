"""The output layer (``lm_head``) quantized, an option off by default (``gqsa compress --quantize-lm-head BITS``).

GPTQ at ``bits`` in groups of :data:`HEAD_GROUP` inputs, no sparsity, calibrated on the inputs the head receives
from the model as it is (the compressed model, when this runs after the other layers). A head tied to the input
embedding is untied first: the embedding stays dense, the head becomes a :class:`~gqsa.nn.GQSALinear`, and the
model's config says the two are no longer tied (so a loader does not tie them again).

At decode the head is one more GEMV (LLaMA-2-7B: 32000 × 4096, 262 MB in fp16: 2 % of the weights an fp16 step
reads, 9 % of a W4 S50 G16 step's 2.90 GB; 136 MB at 8 bits, 71 MB at 4); its accuracy cost is in
``benchmarks/RESULTS.md`` ("Session 9").
"""
from __future__ import annotations

import torch
from torch import nn

from . import prune
from .blockwise import HessianAccumulator
from .config import LM_HEAD_BITS
from .format import PackedLinear, pack

HEAD_GROUP = 128  # inputs per quantization group of the head


class _Stop(Exception):
    """Raised by the head's hook once its input is recorded: the logits are not needed."""


def check_head_bits(bits: int) -> None:
    if bits not in LM_HEAD_BITS:
        raise ValueError(f"the output layer is quantized to {' or '.join(map(str, LM_HEAD_BITS))} bits, not {bits}")


def output_layer(model) -> nn.Linear:
    """The model's output layer (``get_output_embeddings()``), which must be a plain ``nn.Linear``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer to quantize "
                         f"(found {type(head).__name__}); leave out --quantize-lm-head")
    return head


def head_name(model) -> str:
    head = output_layer(model)
    return next(name for name, m in model.named_modules() if m is head)


def untie(model) -> None:
    """Give the output layer its own weight when it shares the input embedding's, and say so in the config."""
    head = output_layer(model)
    emb = model.get_input_embeddings()
    if emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False


@torch.no_grad()
def head_hessian(model, tokens: torch.Tensor, device, batch_size: int = 8) -> torch.Tensor:
    """``XᵀX / n`` (float32) of the output layer's inputs for the windows ``tokens`` ``[n, T]``, the model run on
    ``device`` (and moved back) up to the head; the logits are never computed."""
    head = output_layer(model)
    home = next(model.parameters()).device
    model.to(device)
    acc = HessianAccumulator(head)

    def record(module, args):
        acc.add(args[0])
        raise _Stop

    stop = head.register_forward_pre_hook(record)
    try:
        for i in range(0, tokens.shape[0], batch_size):
            try:
                model(tokens[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        stop.remove()
        h = acc.remove()
        model.to(home)
    return h


def quantize_head(model, tokens: torch.Tensor, bits: int, device, batch_size: int = 8,
                  damp: float = 0.01) -> tuple[str, PackedLinear]:
    """GPTQ of the output layer at ``bits`` (groups of :data:`HEAD_GROUP`) on its inputs for ``tokens``:
    ``(module name, packed layer)``. The model is untied (:func:`untie`) but otherwise unchanged: put the layer in
    with :func:`gqsa.blockwise.replace_linears`."""
    check_head_bits(bits)
    untie(model)
    head = output_layer(model)
    name = head_name(model)
    h = head_hessian(model, tokens, device, batch_size)
    w = head.weight.detach().to(device, torch.float32)
    keep = torch.ones(w.shape[0], -(-w.shape[1] // HEAD_GROUP), dtype=torch.bool, device=w.device)  # no sparsity
    cw = prune.compress_obs(w, h.to(device), keep, bits, HEAD_GROUP, "mse", damp)  # GPTQ (no act-order)
    return name, pack(cw.codes, cw.scale, cw.zero, cw.mask, tuple(w.shape), bits, HEAD_GROUP).to("cpu")
