"""Asymmetric uniform per-group quantization: ``Ŵ = s · (q − z)``, ``q ∈ [0, 2^b − 1]``.

A *group* is ``G`` consecutive weights of one row along the input dimension; everything here works
on tensors whose last dimension is the group (``[..., G]``) and whose leading dimensions index
groups, so the same code serves one group, one row or a whole layer.

Storage precision is part of the quantizer: scales are rounded to float16 (and integer zero points
to integers) as soon as they are made, so the fake-quantized weight used for calibration and
training equals, bit for bit, the weight a packed checkpoint dequantizes to.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128)
_MIN_SCALE = 1e-5  # stays a positive float16 (subnormal range starts at 6e-8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def check_group_size(group_size: int) -> None:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Clamp to a positive float16 value and round to float16, keeping the input dtype."""
    return scale.clamp(min=_MIN_SCALE, max=65504.0).to(torch.float16).to(scale.dtype)


def minmax_params(w: torch.Tensor, bits: int, valid: torch.Tensor | None = None):
    """Scale and integer zero point from each group's min and max (``w``: ``[..., G]``).

    ``valid`` (broadcastable to ``w``) marks the real elements of a padded group; padding does not
    widen the range.
    """
    if valid is not None:
        wmin = torch.where(valid, w, torch.full_like(w, float("inf"))).amin(-1)
        wmax = torch.where(valid, w, torch.full_like(w, float("-inf"))).amax(-1)
    else:
        wmin, wmax = w.amin(-1), w.amax(-1)
    return _params_from_range(wmin, wmax, bits)


def _params_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int):
    qm = qmax(bits)
    # A constant group (wmin == wmax) still needs a usable range that contains its value.
    span = (wmax - wmin).clamp(min=1e-8)
    scale = round_scale(span / qm)
    zero = torch.round(-wmin / scale).clamp(0, qm)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / s + z), 0, 2^b − 1)`` as float (``scale``/``zero``: ``[...]``;
    ``z`` may be a real number, as after E2E-OQP trains it)."""
    return torch.clamp(torch.round(w / scale[..., None] + zero[..., None]), 0, qmax(bits))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``s · (q − z)`` in the dtype of ``scale``; the one formula every path uses."""
    return scale[..., None] * (q.to(scale.dtype) - zero[..., None].to(scale.dtype))


def mse_params(
    w: torch.Tensor,
    bits: int,
    valid: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    grid: int = 40,
    max_shrink: float = 0.6,
):
    """Clipping search: shrink each group's range ``[min, max]`` by factors in ``[1 − max_shrink, 1]``
    and keep, per group, the factor with the smallest (importance-weighted) squared error.

    ``importance`` (broadcastable to ``w``, e.g. the squared activation norm of each input column)
    weights the error of each element; padding (``valid`` False) never counts.
    """
    if valid is not None:
        wmin = torch.where(valid, w, torch.full_like(w, float("inf"))).amin(-1)
        wmax = torch.where(valid, w, torch.full_like(w, float("-inf"))).amax(-1)
    else:
        wmin, wmax = w.amin(-1), w.amax(-1)
    weight = torch.ones_like(w) if importance is None else importance.expand_as(w).to(w.dtype)
    if valid is not None:
        weight = weight * valid
    best_scale, best_zero = _params_from_range(wmin, wmax, bits)
    best_err = _weighted_err(w, best_scale, best_zero, bits, weight)
    for i in range(1, grid + 1):
        ratio = 1.0 - max_shrink * i / grid
        scale, zero = _params_from_range(wmin * ratio, wmax * ratio, bits)
        err = _weighted_err(w, scale, zero, bits, weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _weighted_err(w, scale, zero, bits, weight):
    diff = dequantize(quantize(w, scale, zero, bits), scale, zero) - w
    return (diff.square() * weight).sum(-1)


def init_params(w: torch.Tensor, bits: int, method: str = "mse", **kw):
    """Quantization parameters of each group by ``method`` ∈ {``minmax``, ``mse``}."""
    check_bits(bits)
    if method == "minmax":
        kw.pop("importance", None)
        return minmax_params(w, bits, **kw)
    if method == "mse":
        return mse_params(w, bits, **kw)
    raise ValueError(f"unknown quantization init '{method}': use 'minmax' or 'mse'")


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` in the forward pass (a rounding), the identity's gradient in the backward pass."""
    return _StraightThrough.apply(x, fn)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` with a straight-through (identity) gradient."""
    return straight_through(torch.round, x)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``w`` (``[..., G]``) with gradients to ``w``, ``scale`` and ``zero``.

    Rounding uses the straight-through estimator and the clamp passes gradient only inside the
    range (LSQ/OmniQuant style), so the weights, the scales and the zero points can all be trained.
    The forward value equals ``dequantize(quantize(w, s, z), s, z)`` exactly.
    """
    q = torch.clamp(round_ste(w / scale[..., None] + zero[..., None]), 0, qmax(bits))
    return dequantize(q, scale, zero)


# ----------------------------------------------------------------------------- bit packing


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., G]`` into bytes ``[..., G·bits/8]`` as a little-endian bit stream
    (element ``i`` occupies bits ``i·b … i·b+b−1``; for 4 bits the low nibble is the even element)."""
    check_bits(bits)
    g = q.shape[-1]
    if (g * bits) % 8:
        raise ValueError(f"a group of {g} codes of {bits} bits does not fill whole bytes")
    q = q.to(torch.int32)
    if bits == 8:
        return q.to(torch.uint8)
    shifts = torch.arange(bits, device=q.device, dtype=torch.int32)
    bitstream = ((q[..., None] >> shifts) & 1).reshape(*q.shape[:-1], g * bits // 8, 8)
    weights = 1 << torch.arange(8, device=q.device, dtype=torch.int32)
    return (bitstream * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bytes ``[..., G·bits/8]`` → codes ``[..., G]`` (uint8)."""
    check_bits(bits)
    if bits == 8:
        return packed.to(torch.uint8)
    p = packed.to(torch.int32)
    if bits == 4:  # the common case, without the bit-level detour
        return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], group_size).to(torch.uint8)
    shifts = torch.arange(8, device=p.device, dtype=torch.int32)
    bitstream = ((p[..., None] >> shifts) & 1).reshape(*p.shape[:-1], group_size, bits)
    weights = 1 << torch.arange(bits, device=p.device, dtype=torch.int32)
    return (bitstream * weights).sum(-1).to(torch.uint8)


def repack_codes(packed: torch.Tensor, bits: int, new_bits: int, group_size: int, chunk: int | None = None
                 ) -> torch.Tensor:
    """Codes packed at ``bits`` (``[nnz, G·bits/8]`` bytes, :func:`pack_codes`) packed again at ``new_bits ≥ bits``:
    the same integers in wider fields, ``chunk`` groups at a time (default: about 64 MB of temporaries; the unpacking
    detour holds about 32 bytes per code)."""
    check_bits(bits)
    check_bits(new_bits)
    if new_bits < bits:
        raise ValueError(f"cannot repack {bits}-bit codes into {new_bits} bits")
    chunk = chunk or max(1, (64 << 20) // (32 * group_size))
    out = torch.empty(packed.shape[0], group_size * new_bits // 8, dtype=torch.uint8, device=packed.device)
    for lo in range(0, packed.shape[0], chunk):
        out[lo:lo + chunk] = pack_codes(unpack_codes(packed[lo:lo + chunk], bits, group_size), new_bits)
    return out
