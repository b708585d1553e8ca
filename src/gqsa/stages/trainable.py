"""The training-time linears of the trained stages, apart from the deployed :class:`gqsa.nn.GQSALinear`:
:class:`FakeQuantLinear` (BQPO: latent weights, scales and zero points through fake quantization, mask held)
and :class:`ScaleTrainableLinear` (E2E-OQP: trainable scales, optionally the kept codes; the mask frozen)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import quant
from ..format import PackedLinear
from ..prune import CompressedWeight
from . import common


class FakeQuantLinear(nn.Module):
    """Train-time form of one compressed linear, started from a one-shot result ``cw``.

    Trainable: ``u`` ``[N, C, G]`` — the latent code offset ``q − z`` on the initial grid (in units of its
    group's initial scale ``s0``; initially the integer ``q − z``, so training starts exactly at the one-shot
    weight); ``gamma`` ``[N, C]`` — the scale as a multiple of ``s0``; ``zero`` ``[N, C]`` — a real latent
    zero point. The forward weight is ``s · (q − z)`` with the codes ``q = clamp(round(u) + z, 0, 2^b−1)``,
    ``s = round_scale(s0·gamma)`` (float16, as stored) and ``z = clamp(round(zero), 0, 2^b−1)``, the roundings
    with straight-through gradients, and pruned groups set to exactly 0; :meth:`export` returns the same
    weight as integer codes, bit for bit.

    The codes sit on the initial grid and the scale multiplies them, so a scale's gradient is the true
    ``Σ dL/dw · (q − z)``. (Until session 8 the forward was ``fake_quant(u·s0, s, z)``, LSQ-style: with ``u``
    on the grid at the start, ``round(w/s) − w/s = 0`` and a scale got gradient only from clamped weights,
    which AdamW turned into full-size steps; BQPO then never improved a 3-bit G128 sparsity-0 block,
    benchmarks/RESULTS.md "Session 8".)
    """

    def __init__(self, cw: CompressedWeight, in_features: int, bits: int, bias: torch.Tensor | None = None):
        super().__init__()
        n, c, g = cw.codes.shape
        self.in_features, self.out_features, self.bits, self.group_size = in_features, n, bits, g
        self.register_buffer("s0", cw.scale.float().clone())
        self.register_buffer("mask", cw.mask.bool()[..., None].clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.u = nn.Parameter(cw.codes.float() - cw.zero.float()[..., None])
        self.gamma = nn.Parameter(torch.ones(n, c, device=cw.scale.device))
        self.zero = nn.Parameter(cw.zero.float().clone())
        self.score = None  # learnable group scores [N, C] (:mod:`gqsa.stages.mask_learning`), else None

    def scale_value(self) -> torch.Tensor:
        return common.round_scale_ste(self.s0 * self.gamma)

    def zero_value(self) -> torch.Tensor:
        return torch.clamp(quant.round_ste(self.zero), 0, quant.qmax(self.bits))

    def _codes(self, z: torch.Tensor) -> torch.Tensor:
        """``q = clamp(round(u) + z, 0, 2^b − 1)`` (the rounding straight-through), ``[N, C, G]``."""
        return torch.clamp(quant.round_ste(self.u) + z[..., None], 0, quant.qmax(self.bits))

    def group_weights(self) -> torch.Tensor:
        """``s · (q − z)`` of every group, pruned ones included, ``[N, C, G]`` (float32)."""
        s, z = self.scale_value(), self.zero_value()
        return quant.dequantize(self._codes(z), s, z)

    def _weight(self) -> torch.Tensor:
        w = self.group_weights()
        out = torch.where(self.mask, w, torch.zeros((), device=w.device))
        if self.score is not None and self.score.requires_grad:
            # straight-through top-k: the forward value is the hard mask's (the added term is exactly 0);
            # a group's score gets the gradient of its mask entry, Σ dL/dW · W over the group
            out = out + w.detach() * (self.score - self.score.detach())[..., None]
        return out.reshape(self.out_features, -1)[:, : self.in_features]

    def weight(self) -> torch.Tensor:
        """The fake-quantized, masked weight ``[N, K]`` (float32)."""
        if torch.is_grad_enabled() and self.u.requires_grad:
            # recomputed in the backward pass: only the matmul's copy of the weight is kept
            return checkpoint(self._weight, use_reentrant=False)
        return self._weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> CompressedWeight:
        """Round to integer codes: the weight :meth:`weight` computes, as codes, scales, zeros."""
        s = quant.round_scale(self.s0 * self.gamma)
        z = torch.clamp(torch.round(self.zero), 0, quant.qmax(self.bits))
        codes = self._codes(z)
        w = torch.where(self.mask, quant.dequantize(codes, s, z), torch.zeros((), device=s.device))
        return CompressedWeight(codes, s, z, self.mask[..., 0].clone(),
                                w.reshape(self.out_features, -1)[:, : self.in_features].clone())



class ScaleTrainableLinear(nn.Module):
    """A packed layer with trainable scales (and optionally real zero points); the mask frozen, and the codes
    too unless ``train_codes``: then every kept weight's code has a real latent value ``v`` ``[nnz, G]``
    (started at the stored integer code) and the forward code is ``clamp(round(v), 0, 2^b − 1)`` with a
    straight-through gradient — end-to-end quantization-aware training of the kept weights, still exported
    bit for bit as the weight the forward pass used."""

    def __init__(self, packed: PackedLinear, bias: torch.Tensor | None = None, train_zero: bool = False,
                 train_codes: bool = False):
        super().__init__()
        n, k = packed.shape
        self.shape, self.bits, self.group_size, self.train_zero = (n, k), packed.bits, packed.group_size, train_zero
        self.in_features, self.out_features = k, n
        for name in ("row_ptr", "col_idx", "qweight"):
            self.register_buffer(name, getattr(packed, name).clone())
        self.register_buffer("zeros_int", None if train_zero else packed.zeros.clone())
        self.register_buffer("flat", packed.group_rows() * packed.n_group_cols + packed.col_idx.long())
        self.n_group_cols = packed.n_group_cols
        self.register_buffer("s0", packed.scales.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.gamma = nn.Parameter(torch.ones_like(self.s0))
        self.zero = nn.Parameter(packed.zeros.float().clone()) if train_zero else None
        self.codes_latent = (nn.Parameter(quant.unpack_codes(packed.qweight, packed.bits, packed.group_size).float())
                             if train_codes else None)

    def scales(self) -> torch.Tensor:
        return common.round_scale_ste(self.s0 * self.gamma)

    def zeros(self) -> torch.Tensor:
        return common.round_half_ste(self.zero) if self.train_zero else self.zeros_int.float()

    def codes(self) -> torch.Tensor:
        """The kept weights' integer codes ``[nnz, G]`` (float; straight-through rounding when trained)."""
        if self.codes_latent is None:
            return quant.unpack_codes(self.qweight, self.bits, self.group_size).float()
        return torch.clamp(quant.round_ste(self.codes_latent), 0, quant.qmax(self.bits))

    def weight(self) -> torch.Tensor:
        """Dense ``[N, K]`` float32 weight: the formula of :func:`gqsa.kernels.reference.dequantize`."""
        n, k = self.shape
        w = quant.dequantize(self.codes(), self.scales(), self.zeros())  # [nnz, G]
        dense = w.new_zeros(n * self.n_group_cols, self.group_size).index_copy(0, self.flat, w)
        return dense.reshape(n, -1)[:, :k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> PackedLinear:
        scales = quant.round_scale(self.s0 * self.gamma).to(torch.float16)
        zeros = self.zero.to(torch.float16) if self.train_zero else self.zeros_int.clone()
        qweight = (self.qweight.clone() if self.codes_latent is None
                   else quant.pack_codes(self.codes().to(torch.uint8), self.bits))
        return PackedLinear(row_ptr=self.row_ptr.clone(), col_idx=self.col_idx.clone(), qweight=qweight,
                            scales=scales, zeros=zeros, shape=self.shape, bits=self.bits, group_size=self.group_size)
