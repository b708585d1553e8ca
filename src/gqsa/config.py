"""``GQSAConfig``: every setting of a compression run, validated once, recorded in the report."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from . import quant

SALIENCIES = ("magnitude", "wanda", "hessian")
ALLOCATIONS = ("row", "layer")
QUANT_INITS = ("minmax", "mse")


@dataclass
class GQSAConfig:
    """Settings of GQSA compression.

    bits, group_size: weight bits ``b`` and group width ``G`` (one group = one pruning unit = one
        quantization group).
    sparsity: fraction of groups removed in each compressed linear (0 ≤ S < 1).
    saliency: how groups are ranked for removal: ``magnitude`` (Σ|W|), ``wanda``
        (Σ|W|·‖X_col‖₂) or ``hessian`` (group OBS error ``w_gᵀ [H⁻¹]_gg⁻¹ w_g`` from the layer's
        ``H = XᵀX``, followed by SparseGPT/GPTQ-style compensation of the kept weights).
    allocation: ``row`` keeps exactly the same number of groups in every row; ``layer`` ranks all
        groups of the layer together.
    quant_init: ``minmax`` or ``mse`` (clipping search minimizing the group's squared error,
        weighted by activation energy when calibration data is there).
    damp: Hessian dampening as a fraction of its mean diagonal (hessian saliency).
    skip: module-name suffixes never compressed (embeddings, norms and lm_head are never touched).
    seed: seeds calibration sampling and everything random.
    """

    bits: int = 4
    group_size: int = 16
    sparsity: float = 0.5
    saliency: str = "hessian"
    allocation: str = "row"
    quant_init: str = "mse"
    damp: float = 0.01
    skip: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        quant.check_bits(self.bits)
        quant.check_group_size(self.group_size)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name, value, allowed in (("saliency", self.saliency, SALIENCIES),
                                     ("allocation", self.allocation, ALLOCATIONS),
                                     ("quant_init", self.quant_init, QUANT_INITS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got '{value}'")
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GQSAConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GQSAConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)
