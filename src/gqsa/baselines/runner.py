"""Whole-model baselines, block by block on calibration data (the sequential scheme of GPTQ and
SparseGPT: each block is calibrated on the outputs of the already compressed earlier blocks, and
inside a block the linears are compressed group by group in execution order, each group seeing the
block as compressed so far: methods of the block-wise driver :func:`gqsa.blockwise.run_blocks`);
``gqsa compress --method …`` writes them through :func:`gqsa.workflow.compress_to_folder`.

Output: RTN and GPTQ (no sparsity, ``G`` ∈ {16, 32, 64, 128}) are exactly representable in the
packed GQSA format (every group kept), so they are written as GQSA checkpoint folders and run
through :class:`gqsa.nn.GQSALinear`. Wanda, SparseGPT and magnitude keep fp16 values in an
element-wise pattern the group format cannot hold: they are written as ordinary dense model folders
whose pruned weights are exact zeros ("dense with zeros"); their bits per weight are those of the
usual sparse fp16 formats (``n:m``: 16·n/m + the index metadata, 2 bits per kept value for 2:4;
unstructured: 16·(1−S) + a 1-bit bitmap).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import quant
from ..blockwise import block_linear_groups, group_statistics, replace_linears, run_blocks
from ..format import PackedLinear, pack
from ..models.adapters import get_adapter
from ..modules import default_device
from . import masks
from .gptq import gptq_layer
from .magnitude import magnitude_layer
from .rtn import rtn_layer
from .sparsegpt import sparsegpt_layer
from .wanda import wanda_layer

QUANT_METHODS = ("rtn", "gptq")
PRUNE_METHODS = ("wanda", "sparsegpt", "magnitude")
METHODS = QUANT_METHODS + PRUNE_METHODS


@dataclass
class BaselineConfig:
    """Settings of one baseline run.

    method: ``rtn``, ``gptq`` (quantization, every weight kept) or ``wanda``, ``sparsegpt``,
        ``magnitude`` (pruning, fp16 values).
    bits, group_size: quantizer of rtn/gptq (asymmetric, integer zero point per group of G inputs).
    act_order: gptq only: process columns by decreasing ``diag(XᵀX)`` (static groups).
    quant_init: ``minmax`` (the papers' grid) or ``mse`` (clipping search).
    pattern: ``"n:m"`` (keep n of every m consecutive inputs, default 2:4) or ``"unstructured"``.
    sparsity: removed fraction for unstructured pruning.
    damp: Hessian dampening λ as a fraction of the mean diagonal (gptq, sparsegpt).
    blocksize: lazy-update block width (gptq, sparsegpt; also SparseGPT's mask-selection block).
    skip: module-name suffixes left dense.
    prune_bits: sparsegpt only: also quantize the kept values to this many bits in the same sweep
        (groups of ``group_size`` inputs, ``quant_init``), e.g. 2:4 + int4; stored dense with zeros,
        bits per weight those of the packed n:m format (values, index metadata, fp16 scale and 8-bit
        zero point per group).
    """

    method: str
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    quant_init: str = "minmax"
    pattern: str = "2:4"
    sparsity: float = 0.5
    damp: float = 0.01
    blocksize: int = 128
    skip: list[str] = field(default_factory=list)
    prune_bits: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown baseline '{self.method}': use one of {', '.join(METHODS)}")
        if self.method in QUANT_METHODS:
            quant.check_bits(self.bits)
            quant.check_group_size(self.group_size)
            if self.quant_init not in ("minmax", "mse"):
                raise ValueError(f"quant_init must be minmax or mse, got '{self.quant_init}'")
        else:
            nm = masks.parse_pattern(self.pattern)
            if nm is None and not 0.0 < self.sparsity < 1.0:
                raise ValueError(f"unstructured sparsity must be in (0, 1), got {self.sparsity}")
            if self.prune_bits is not None:
                if self.method != "sparsegpt":
                    raise ValueError(f"--prune-bits quantizes the kept weights of sparsegpt only, not {self.method}")
                quant.check_bits(self.prune_bits)
                quant.check_group_size(self.group_size)
                if nm is not None and self.group_size % nm[1]:
                    raise ValueError(f"group size {self.group_size} does not hold whole {self.pattern} blocks")
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")

    @property
    def packed(self) -> bool:
        """Written in the packed GQSA format (else dense with zeros)."""
        return self.method in QUANT_METHODS

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "wanda", "sparsegpt") or (self.method == "rtn" and self.quant_init == "mse")

    def setting(self) -> str:
        """A short human name, e.g. ``gptq W3 g128 act-order`` or ``sparsegpt 2:4``."""
        if self.packed:
            return f"{self.method} W{self.bits} g{self.group_size}" + (" act-order" if self.act_order else "")
        nm = masks.parse_pattern(self.pattern)
        name = f"{self.method} {self.pattern}" if nm else f"{self.method} unstructured {self.sparsity:.0%}"
        return name + (f" + W{self.prune_bits} g{self.group_size}" if self.prune_bits else "")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BaselineResult:
    packed: dict[str, PackedLinear] | None  # rtn/gptq: the packed layers (the model now holds GQSALinear)
    layers: list[dict]                      # per compressed layer: name, shape, kept, sparsity, bits/weight
    totals: dict


def compress_layer(w: torch.Tensor, config: BaselineConfig, hessian: torch.Tensor | None):
    """One weight ``[N, K]`` → ``CompressedWeight`` (rtn/gptq) or ``(pruned weight, kept mask)``."""
    nm = None if config.packed else masks.parse_pattern(config.pattern)
    m = config.method
    if m == "rtn":
        return rtn_layer(w, config.bits, config.group_size, config.quant_init, hessian)
    if m == "gptq":
        return gptq_layer(w, hessian, config.bits, config.group_size, config.act_order, config.quant_init,
                          config.damp, config.blocksize)
    if m == "wanda":
        return wanda_layer(w, hessian, config.sparsity, nm)
    if m == "sparsegpt":
        return sparsegpt_layer(w, hessian, config.sparsity, nm, config.damp, config.blocksize,
                               bits=config.prune_bits, group_size=config.group_size, init=config.quant_init)
    return magnitude_layer(w, config.sparsity, nm)


def sparse_bits_per_weight(kept: int, rows: int, k: int, pattern: tuple[int, int] | None, bits: int | None = None,
                           group_size: int = 128) -> float:
    """Storage bits per original weight of a pruned layer ``[rows, k]`` keeping ``kept`` values: the
    values (fp16, or ``bits``-bit codes plus an fp16 scale and an 8-bit zero point per group of
    ``group_size`` inputs of a row, as the packed GQSA format stores them) and the index metadata
    (``n:m``: ⌈log2 m⌉ bits per kept value; unstructured: a 1-bit bitmap)."""
    weights = rows * k
    if bits is None:
        return 16 * kept / weights + masks.metadata_bits(pattern)
    groups = rows * -(-k // group_size)
    return (bits * kept + (16 + 8) * groups) / weights + masks.metadata_bits(pattern)


@torch.no_grad()
def compress_model_baseline(model, config: BaselineConfig, tokens: torch.Tensor | None = None, device=None,
                            batch_size: int = 8, progress: bool = True) -> BaselineResult:
    """Apply a baseline to every adapter-listed linear of ``model`` in place.

    rtn/gptq: the linears become :class:`GQSALinear` (packed, every group kept). Pruning methods:
    the linears keep their ``nn.Linear`` form with pruned weights set to zero and kept weights
    rounded to fp16.
    """
    device = default_device(device)
    adapter = get_adapter(model)
    if config.needs_calibration and tokens is None:
        raise ValueError(f"{config.method} needs calibration tokens")
    packed: dict[str, PackedLinear] = {}
    layers: list[dict] = []

    def method(i, block, prefix, batches):
        linears = adapter.linears(block)
        for group in block_linear_groups(adapter, block, prefix, i, config):
            stats = group_statistics(block, linears, group, batches, stop_early=not adapter.generic) \
                if batches is not None else {}
            for n in group:
                layers.append(_compress_linear(linears[n], f"{prefix}.{i}.{n}", config, stats.get(n), packed))

    run_blocks(model, tokens if config.needs_calibration else None, device, batch_size, method,
               desc=config.setting(), progress=progress)
    if config.packed:
        replace_linears(model, packed)
    weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
    compressed_bits = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in layers)
    if config.packed:
        compressed_bytes = sum(p.nbytes() for p in packed.values())
    else:
        compressed_bytes = round(compressed_bits / 8)
    dense_params = sum(p.numel() for p in model.parameters()) - (0 if config.packed else weights)
    totals = {
        "compressed_layers": len(layers),
        "compressed_weights": weights,
        "sparsity": round(1 - sum(r["kept"] for r in layers) / max(weights, 1), 4),
        "bits_per_weight": round(8 * compressed_bytes / max(weights, 1), 4),
        "compressed_bytes": compressed_bytes,
        "fp16_bytes_of_compressed_layers": 2 * weights,
        "dense_params_uncompressed": dense_params,
        "model_fp16_bytes": 2 * (weights + dense_params),
        "model_bytes": compressed_bytes + 2 * dense_params,
    }
    if config.packed:
        totals["packed_bytes"] = compressed_bytes
    return BaselineResult(packed if config.packed else None, layers, totals)


def _compress_linear(lin, name: str, config: BaselineConfig, hessian, packed: dict) -> dict:
    """Compress one linear in place (packed methods: into ``packed[name]`` too); its row of the report."""
    rows, k = lin.weight.shape
    out = compress_layer(lin.weight.float(), config, hessian)
    if config.packed:
        lin.weight.copy_(out.weight.to(lin.weight.dtype))
        packed[name] = pack(out.codes, out.scale, out.zero, out.mask, (rows, k), config.bits,
                            config.group_size).to("cpu")
        kept = rows * k
        bpw = packed[name].bits_per_weight()
    else:
        weight, keep = out
        lin.weight.copy_(weight.half().to(lin.weight.dtype))  # fp16 values, exact zeros
        kept = int(keep.sum())
        bpw = sparse_bits_per_weight(kept, rows, k, masks.parse_pattern(config.pattern),
                                     config.prune_bits, config.group_size)
    return {"name": name, "shape": [rows, k], "kept": kept,
            "sparsity": round(1 - kept / (rows * k), 4), "bits_per_weight": round(bpw, 4)}


def save_dense(model, folder, tokenizer=None, report: dict | None = None, overwrite: bool = False) -> Path:
    """Write an ordinary model folder (``save_pretrained``, safetensors) atomically: a temporary
    sibling folder renamed into place when complete; ``gqsa_report.json`` records checksums."""
    from ..checkpoint import atomic_folder, write_report

    with atomic_folder(folder, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report)
    return Path(folder)
