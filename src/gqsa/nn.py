"""``GQSALinear``: an ``nn.Linear`` replacement that holds a packed GQSA layer."""
from __future__ import annotations

import os

import torch
from torch import nn

from .format import TENSOR_NAMES, FormatError, PackedLinear
from .kernels import reference


def cpu_weight_cache_default() -> bool:
    """Whether new layers cache their dequantized weight off CUDA (``GQSA_CPU_WEIGHT_CACHE``, on by default)."""
    return os.environ.get("GQSA_CPU_WEIGHT_CACHE", "1") not in ("0", "false", "no", "off")


class GQSALinear(nn.Module):
    """A linear layer stored in the packed BSR format (see :mod:`gqsa.format`).

    The packed tensors are buffers, so ``state_dict()`` is exactly the checkpoint layout and
    ``load_state_dict`` accepts any number of kept groups (the buffers take the loaded sizes, after
    validation). ``forward`` computes ``x @ Ŵᵀ + b``: on CUDA through the fused Triton kernels of
    :mod:`gqsa.kernels` (a :class:`~gqsa.kernels.dispatch.LinearPlan` built on the first CUDA call:
    decode GEMV at batch 1, tensor-core GQSA GEMM above, by a measured crossover table; layers pruned
    with ``--allocation blockR`` / ``clusterR`` are detected and take the block-uniform kernel of
    :mod:`gqsa.kernels.block_gemm`), elsewhere through the pure-torch reference. ``backend = "reference"`` forces the reference everywhere.

    Off CUDA, the dense weight that the reference rebuilds is cached per layer (``N×K`` in the input's
    dtype: 4 bytes per original weight in float32, i.e. what the layer costs in a dense fp32 model, on
    top of the packed buffers) and reused while the packed buffers are the same tensors, unmodified
    (identity, storage pointer and in-place version of each are checked on every call) and the input
    dtype is the same; ``load_state_dict``, device moves and buffer reassignment drop it. The output
    is bitwise the reference's (the same ``dequantize`` then ``F.linear``). ``cpu_weight_cache =
    False`` on a layer, or ``GQSA_CPU_WEIGHT_CACHE=0`` in the environment, turns it off (memory-tight
    runs); :meth:`drop_weight_cache` frees it.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 16,
                 bias: bool = False, float_zeros: bool = False, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        empty = torch.empty(0, dtype=torch.uint8)
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("col_idx", torch.empty(0, dtype=torch.int16))
        self.register_buffer("qweight", empty.reshape(0, group_size * bits // 8))
        self.register_buffer("scales", torch.empty(0, dtype=torch.float16))
        self.register_buffer("zeros", torch.empty(0, dtype=torch.float16 if float_zeros else torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.backend = "auto"
        self._plan = None
        self.cpu_weight_cache = cpu_weight_cache_default()
        self._dense = None  # (dtype, weight, buffer state): the cached dequantized weight of the CPU path

    @classmethod
    def from_packed(cls, packed: PackedLinear, bias: torch.Tensor | None = None) -> "GQSALinear":
        n, k = packed.shape
        m = cls(k, n, packed.bits, packed.group_size, bias=bias is not None, float_zeros=packed.float_zeros,
                dtype=bias.dtype if bias is not None else torch.float16)
        for name, t in packed.tensors().items():
            setattr(m, name, t)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    @property
    def packed(self) -> PackedLinear:
        return PackedLinear(**{n: getattr(self, n) for n in TENSOR_NAMES},
                            shape=(self.out_features, self.in_features), bits=self.bits, group_size=self.group_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        found = {n: state_dict[prefix + n] for n in TENSOR_NAMES if prefix + n in state_dict}
        if found:
            if len(found) < len(TENSOR_NAMES):
                missing_keys.extend(prefix + n for n in TENSOR_NAMES if n not in found)
                return
            PackedLinear(**found, shape=(self.out_features, self.in_features), bits=self.bits,
                         group_size=self.group_size).validate(prefix.rstrip(".") or "GQSALinear")
            for n, t in found.items():
                setattr(self, n, t.to(getattr(self, n).device))
            self._plan = None
            self._dense = None
        bias_key = prefix + "bias"
        if self.bias is not None and bias_key in state_dict:
            self.bias.data = state_dict[bias_key].to(self.bias.device, self.bias.dtype)
        elif self.bias is not None:
            missing_keys.append(bias_key)

    def _apply(self, fn, recurse=True):
        """Device moves apply to the packed tensors; dtype casts (``model.half()``, ``.to(bf16)``) do
        not: their dtypes are the format."""
        saved = {n: getattr(self, n) for n in TENSOR_NAMES}
        self._plan = None
        self._dense = None
        super()._apply(fn, recurse)
        for n, t in saved.items():
            moved = getattr(self, n)
            if moved.dtype != t.dtype:
                setattr(self, n, t.to(moved.device))
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return reference.dequantize(self.packed, dtype)

    def drop_weight_cache(self) -> None:
        """Free the cached dense weight of the CPU path (rebuilt on the next call if the cache is on)."""
        self._dense = None

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``reference.dequantize(self.packed, dtype)``, rebuilt only when a packed buffer changed."""
        d = self._dense
        if d is not None and d[0] == dtype:
            buffers = self._buffers
            for name, t, ptr, version in d[2]:
                if buffers[name] is not t or t._version != version or t.data_ptr() != ptr:
                    break
            else:
                return d[1]
        self._dense = None  # free the old weight before building the new one
        try:
            state = tuple((n, t, t.data_ptr(), t._version) for n, t in ((n, self._buffers[n]) for n in TENSOR_NAMES))
        except RuntimeError:  # inference-mode tensors have no version counter: do not cache
            return reference.dequantize(self.packed, dtype)
        with torch.no_grad():
            w = reference.dequantize(self.packed, dtype)
        self._dense = (dtype, w, state)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_weight_cache and self.backend == "auto" and not x.is_cuda:  # CPU: the cached weight
            bias = self._parameters.get("bias")
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            return torch.nn.functional.linear(x, self._cached_weight(x.dtype), bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.backend == "auto" and x.is_cuda:
            if self._plan is None:
                from .kernels import dispatch

                self._plan = dispatch.prepare(self.packed)
            return self._plan(x, bias)
        if self.backend in ("auto", "reference"):
            return reference.linear(x, self.packed, bias)
        raise FormatError(f"unknown GQSALinear backend '{self.backend}': use 'auto' or 'reference'")

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sparsity={p.sparsity:.3f}, bias={self.bias is not None}")
