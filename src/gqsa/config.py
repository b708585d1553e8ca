"""``GQSAConfig``: every setting of a compression run, validated once, recorded in the report."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from . import quant
from .calib import held_out_count

SALIENCIES = ("magnitude", "wanda", "hessian")
ALLOCATIONS = ("row", "layer", "block16", "block32", "block64", "block128", "cluster16", "cluster32", "cluster64", "cluster128")
QUANT_INITS = ("minmax", "mse")
STAGES = ("oneshot", "bqpo", "bqpo+e2e")
BQPO_TARGETS = ("fp", "qinput")
E2E_LOSSES = ("lm", "kd")
# e2e_lr of each E2E-OQP objective when not given (kd: the rate of every accuracy table since session 8; lm: its best)
E2E_LR = {"kd": 1e-2, "lm": 1e-3}
# e2e_lr_codes=None (the default): the kept codes train at CODES_LR when E2E-OQP distils (kd) over at least
# CODES_MIN_STEPS optimizer steps, else stay frozen. gutenberg-llama-22m W4 S50 G16, kd, held-out KL on the disjoint
# calibration split (benchmarks/RESULTS.md "Session 17"): 0.1 lost at 58 and 145 steps, was even or lost at 290,
# won at 580 (128 and 256 windows: -3 to -4 % held-out KL, -5 % perplexity; 2048: -9 %); 500 lies between, so that
# the default 5 epochs over 512 windows (575 steps) or more (580) train them. Only on sparse layers of 4+ bits: at 1024
# windows (580 steps) W4 S50 G16 75.04 → 69.48 and W4 S30 G64 rerank4 65.94 → 62.27, but W3 S0 G128 50.94 → 51.71 (no
# epoch improved on the held-out split; "Session 17" item 4)
CODES_LR = 0.1
CODES_MIN_STEPS = 500
AMP_DTYPES = ("auto", "none", "bfloat16", "float16")
ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")

# Named bundles of stage settings; explicit arguments override them (see GQSAConfig.preset).
PRESETS: dict[str, dict] = {
    "default": {},
    # ~4x less training: for CPU runs of small models and quick checks.
    "fast": {"bqpo_epochs": 5, "bqpo_patience": 2, "e2e_epochs": 2},
}

LM_HEAD_BITS = (4, 8)  # the output layer's bits (lm_head_bits, gqsa.head)
BATCH_WINDOWS = 512  # calibration windows per 4 windows of a training step, when the batch sizes are not given


def auto_batch_size(n_windows: int) -> int:
    """Windows per training step (BQPO and E2E-OQP) for ``n_windows`` calibration windows when not given: 4 up to
    1023 windows, then 4 per 512 windows, at most 16 — so 1024 or 2048 windows train in about the time of 512.
    Measured on gutenberg-llama-22m W4 S50 G16 (benchmarks/RESULTS.md, "Session 9"): at a fixed number of epochs
    the batch size moved perplexity by under 0.5 % (512 windows: 76.65 at 4, 77.01 at 8; 1024: 73.82 at 8 and
    73.91 at 16 with twice the epochs), while more windows lowered it (2048 windows at 16: 72.39)."""
    return 4 * min(4, max(1, n_windows // BATCH_WINDOWS))


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
        groups of the layer together; ``blockR`` (R = 16, 32, 64, 128) keeps the same group columns in
        every run of R consecutive rows (same count in every run): coarser masks that the block
        kernels serve without per-row indices; ``clusterR`` the same with any R rows per cluster (chosen to keep
        the most saliency, see :func:`gqsa.prune.cluster_assignment`), the kernels writing rows back in order.
    quant_init: ``minmax`` or ``mse`` (clipping search minimizing the group's squared error,
        weighted by activation energy when calibration data is there).
    damp: Hessian dampening as a fraction of its mean diagonal (hessian saliency).
    mask: how the group mask is chosen with ``hessian`` saliency: ``fixed`` (ranked once on the
        original weights, then the OBS sweep), ``iterN`` (N rounds of removing a share of the groups,
        re-solving the kept weights by least squares and re-ranking), ``cgN`` (the fixed mask, then the
        kept weights re-fitted towards that least-squares optimum by N conjugate-gradient steps
        before quantization; default ``cg20``: gutenberg-llama-22m W4 S50 G16 one-shot 464 → 280 in
        benchmarks/RESULTS.md), ``qcgN`` (``cgN`` with the groups ranked by what keeping them saves once
        quantized: :func:`gqsa.prune.quant_aware_saliency`; measured no better than ``cgN``), ``rerankN`` (N rounds, each ranking the groups on the weights as
        re-fitted by the previous round, removing up to that round's share of the target and re-fitting
        by 20 CG steps; any allocation), ``adaptive[B]`` (chosen per
        block of B groups from the weights as compensated by the sweep).
    target_bits: when set, every compressed linear gets its own sparsity (row-balanced) so that the
        packed linears take at most this many bits per weight, at the least measured error
        (:mod:`gqsa.allocation`; ``sparsity`` is then ignored); the choice is recorded in
        ``layer_sparsity``.
    skip: module-name suffixes never compressed (embeddings and norms are never touched).
    lm_head_bits: ``None`` (default) leaves the output layer dense; 4 or 8 quantizes it after the blocks (GPTQ in
        groups of 128, no sparsity, on its inputs from the compressed model; E2E-OQP then trains its scales with
        the others): :mod:`gqsa.head`. A tied output layer is untied (the input embedding stays dense).
    seed: seeds calibration sampling and everything random.

    Stages (:mod:`gqsa.stages`):

    stages: ``oneshot`` (saliency + mask + OBS/RTN quantization only), ``bqpo`` (then block-wise
        training of each block's latent weights and ``s, z`` through fake quantization, mask held) or
        ``bqpo+e2e`` (then end-to-end training of the scales, optionally of the kept codes, mask frozen; default).
    val_fraction: fraction of the calibration windows held out (never trained on) for early stopping
        and best-epoch selection in both trained stages (at least one window when > 0; 0 = none:
        the last epoch is kept); ``gqsa compress`` draws them from the last ``val_fraction`` of the calibration
        text, which no training window covers (:func:`gqsa.calib.sample_windows`).
    amp: autocast dtype of the trained stages on CUDA: ``auto`` = bfloat16 on CUDA, none on CPU.
    bqpo_epochs, bqpo_batch_size: passes over the training windows per block, windows per step (``None``:
        :func:`auto_batch_size` of the calibration windows, 4 up to 1023 windows).
    bqpo_lr_weight: AdamW learning rate of the latent weights, which are parametrized in units of
        their group's initial quantization step (so the rate means "steps per update" whatever the
        weights' magnitude).
    bqpo_lr_scale: learning rate of each group's scale, parametrized as a multiplier of its initial
        value (relative rate).
    bqpo_lr_zero: learning rate of each group's zero point, in code units (it is rounded through the
        straight-through estimator, so it stays an integer in the forward pass).
    bqpo_patience: stop a block after this many epochs without a better held-out loss.
    bqpo_gradual: 0 (default) keeps the one-shot mask frozen through BQPO; ``E`` > 0 starts BQPO from the
        one-shot result at sparsity 0 and removes groups gradually: at the end of each of the first ``E``
        epochs the mask is chosen again (``allocation``) at ``sparsity · e / E`` from the trained weights'
        diagonal OBS saliency ``Σ w² · diag(XᵀX)``, then it is frozen; best-epoch selection and early
        stopping start at epoch ``E`` (needs ``bqpo_epochs`` > ``E``, no ``target_bits``). Measured worse than
        the frozen one-shot mask on gutenberg-llama-22m (benchmarks/RESULTS.md).
    bqpo_learn_mask: 0 (default) keeps the one-shot mask frozen; ``E`` > 0 learns it during the first ``E``
        epochs of BQPO: a score per (row, group), started from the one-shot mask and saliency, picks the
        kept groups by a hard top-k at the linear's sparsity (``allocation``; row-balanced under ``row``)
        after every step, and gets the straight-through gradient of its group's mask entry; the removed groups
        restart from the uncompressed weights; the mask is frozen after epoch ``E`` and best-epoch selection
        starts there (:mod:`gqsa.stages.mask_learning`; needs ``bqpo_epochs`` > ``E``, not with
        ``bqpo_gradual``). Measured worse than the frozen one-shot mask on gutenberg-llama-22m, the more so the
        more the mask moves (benchmarks/RESULTS.md).
    bqpo_lr_mask: AdamW learning rate of those scores (initial scores are ±0.5 around the cut, so about
        ``0.5 / lr`` steps of consistent gradient move a group across it).
    bqpo_target: ``fp`` — the uncompressed block on the uncompressed model's activations (default);
        ``qinput`` — the uncompressed block on the compressed model's activations.
    activation_dtype: storage dtype of the calibration activations kept between blocks.
    offload_activations: keep those activations in CPU memory and stream batches to the device.
    e2e_epochs, e2e_batch_size, e2e_grad_accum: end-to-end passes, windows per micro-batch (``None``: as
        ``bqpo_batch_size``), micro-batches per optimizer step.
    e2e_lr: learning rate of the scales (multipliers of the BQPO scales, relative rate) and, with
        ``e2e_train_zero``, of the zero points (code units; then stored as float16). ``None`` (default): the
        objective's rate of :data:`E2E_LR` — 1e-2 with ``kd`` (the rate of every accuracy table since
        session 8), 1e-3 with ``lm`` (the best of 1e-2…1e-4 on both local models at S30%/S50%; 1e-2 overfits the
        calibration text after one epoch; benchmarks/RESULTS.md).
    e2e_lr_codes: learning rate of the kept weights' latent codes in E2E-OQP (code units per step;
        straight-through rounding, the mask still frozen): end-to-end quantization-aware training of the kept
        weights; 0 freezes the codes (the paper's E2E-OQP). ``None`` (default): :data:`CODES_LR` (0.1) when
        E2E-OQP distils (``kd``) over at least :data:`CODES_MIN_STEPS` (500) optimizer steps
        (:meth:`e2e_steps`: 5 epochs of 512 or more windows with the batch sizes not given) and the layers are
        sparse with 4 or more bits (W3 S0 G128 lost: 50.94 → 51.71 at 1024 windows), else 0;
        :meth:`for_windows` decides, the run's plan line says which and why (:meth:`codes_rule`). It pays with
        many steps: with ``kd``, W4 S50 G16, 0.1 against frozen codes lost at 58 steps (128 windows, ``fast``:
        136.45 → 142.05), lost or tied on the held-out split at 145-290 and won at 580 (128 / 256 / 2048 windows:
        86.69 → 82.56, 80.98 → 77.13, 72.00 → 65.64); with ``lm`` the codes overfit the calibration text (75.67 →
        105.25 at 0.03; benchmarks/RESULTS.md "Session 16", "Session 17"). Costs 16 bytes of device memory per
        kept weight (latent code, gradient, two AdamW moments): when that does not fit, the stage runs again with
        the codes frozen (:func:`gqsa.pipeline.compress_model`).
    e2e_loss: ``kd`` — KL from the uncompressed model's next-token distribution (default; distillation:
        fidelity to the original model rather than fit to the calibration text; needs the uncompressed model
        on the device during E2E-OQP — ``gqsa compress`` reads it again from its source when the stage starts,
        :func:`gqsa.pipeline.compress_model` without ``teacher=`` holds a copy through BQPO; W4 S50 G16 on
        gutenberg-llama-22m 72.00 against ``lm``'s 75.67 with codes frozen); ``lm`` — the causal-LM loss on
        the calibration windows (no copy of the model). ``e2e_lr`` not given follows it.
    e2e_grad_checkpointing: recompute each decoder block in the backward pass (memory ≈ one block's
        activations instead of all of them).
    """

    bits: int = 4
    group_size: int = 16
    sparsity: float = 0.5
    saliency: str = "hessian"
    allocation: str = "row"
    quant_init: str = "mse"
    damp: float = 0.01
    mask: str = "cg20"
    target_bits: float | None = None
    layer_sparsity: dict = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    lm_head_bits: int | None = None
    seed: int = 0
    stages: str = "bqpo+e2e"
    val_fraction: float = 0.1
    amp: str = "auto"
    bqpo_epochs: int = 20
    bqpo_batch_size: int | None = None
    bqpo_lr_weight: float = 0.1
    bqpo_lr_scale: float = 0.03
    bqpo_lr_zero: float = 0.1
    bqpo_patience: int = 4
    bqpo_gradual: int = 0
    bqpo_learn_mask: int = 0
    bqpo_lr_mask: float = 0.05
    bqpo_target: str = "fp"
    activation_dtype: str = "float32"
    offload_activations: bool = False
    e2e_epochs: int = 5
    e2e_batch_size: int | None = None
    e2e_grad_accum: int = 1
    e2e_lr: float | None = None
    e2e_train_zero: bool = False
    e2e_lr_codes: float | None = None
    e2e_loss: str = "kd"
    e2e_grad_checkpointing: bool = True

    def __post_init__(self):
        if self.e2e_lr is None:  # the objective's rate (an unknown objective: validate() names it)
            self.e2e_lr = E2E_LR.get(self.e2e_loss)
        self.validate()

    def validate(self) -> None:
        quant.check_bits(self.bits)
        quant.check_group_size(self.group_size)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if any(not isinstance(s, str) or not s.strip() for s in self.skip):
            raise ValueError(f"skip: an empty suffix matches every layer's name, got {self.skip!r}; give suffixes "
                             "such as mlp.down_proj")
        for name, value, allowed in (("saliency", self.saliency, SALIENCIES),
                                     ("allocation", self.allocation, ALLOCATIONS),
                                     ("quant_init", self.quant_init, QUANT_INITS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got '{value}'")
        if not (self.mask == "fixed" or (self.mask.startswith("iter") and self.mask[4:].isdigit() and int(self.mask[4:]) > 0)
                or (self.mask.startswith("cg") and self.mask[2:].isdigit() and int(self.mask[2:]) > 0)
                or (self.mask.startswith("qcg") and self.mask[3:].isdigit() and int(self.mask[3:]) > 0)
                or (self.mask.startswith("rerank") and self.mask[6:].isdigit() and int(self.mask[6:]) > 0)
                or (self.mask.startswith("adaptive") and (self.mask[8:] == "" or self.mask[8:].isdigit()))):
            raise ValueError(f"mask must be fixed, cgN, qcgN, rerankN, iterN (N >= 1) or adaptive[B]; got '{self.mask}'")
        if self.allocation != "row" and self.mask.startswith(("iter", "adaptive")):
            raise ValueError(f"mask '{self.mask}' keeps the same number of groups in every row: use allocation "
                             f"'row' with it (or mask 'fixed', 'cgN' or 'rerankN')")
        if self.lm_head_bits is not None:
            if self.lm_head_bits not in LM_HEAD_BITS:
                raise ValueError(f"lm_head_bits must be {' or '.join(map(str, LM_HEAD_BITS))} (or None: a dense output "
                                 f"layer), got {self.lm_head_bits}")
            if self.e2e_train_zero:
                raise ValueError("lm_head_bits with e2e_train_zero: the output layer's zero points stay integers; "
                                 "leave out one of --quantize-lm-head and --e2e-train-zero")
        if self.target_bits is not None and not 0.0 < self.target_bits < 16.0:
            raise ValueError(f"target_bits must be in (0, 16), got {self.target_bits}")
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        for name, value, allowed in (("stages", self.stages, STAGES), ("bqpo_target", self.bqpo_target, BQPO_TARGETS),
                                     ("e2e_loss", self.e2e_loss, E2E_LOSSES),
                                     ("amp", self.amp, AMP_DTYPES),
                                     ("activation_dtype", self.activation_dtype, ACTIVATION_DTYPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got '{value}'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("bqpo_epochs", "e2e_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer (0 = no training), got {getattr(self, name)}")
        for name in ("bqpo_batch_size", "bqpo_patience", "e2e_batch_size", "e2e_grad_accum"):
            if name.endswith("batch_size") and getattr(self, name) is None:
                continue  # chosen from the calibration windows (auto_batch_size)
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("bqpo_lr_weight", "bqpo_lr_scale", "bqpo_lr_zero", "bqpo_lr_mask", "e2e_lr", "e2e_lr_codes"):
            value = getattr(self, name)
            if name == "e2e_lr_codes" and value is None:
                continue  # chosen from E2E-OQP's steps (codes_rule)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1) (0 freezes those parameters), got {value}")

        if not isinstance(self.bqpo_gradual, int) or self.bqpo_gradual < 0:
            raise ValueError(f"bqpo_gradual must be a non-negative integer (0 = the one-shot mask), got {self.bqpo_gradual}")
        if self.bqpo_gradual and (self.bqpo_gradual >= self.bqpo_epochs or self.target_bits is not None):
            raise ValueError(f"bqpo_gradual={self.bqpo_gradual} needs more BQPO epochs than that (bqpo_epochs="
                             f"{self.bqpo_epochs}) and no target_bits")
        if not isinstance(self.bqpo_learn_mask, int) or self.bqpo_learn_mask < 0:
            raise ValueError(f"bqpo_learn_mask must be a non-negative integer (0 = the one-shot mask), got "
                             f"{self.bqpo_learn_mask}")
        if self.bqpo_learn_mask and (self.bqpo_learn_mask >= self.bqpo_epochs or self.bqpo_gradual):
            raise ValueError(f"bqpo_learn_mask={self.bqpo_learn_mask} needs more BQPO epochs than that (bqpo_epochs="
                             f"{self.bqpo_epochs}) and no bqpo_gradual")

    @property
    def trained(self) -> bool:
        """True when a training stage (BQPO, E2E-OQP) runs."""
        return self.stages != "oneshot"

    @classmethod
    def preset(cls, name: str, **overrides) -> "GQSAConfig":
        """A config from a named preset (:data:`PRESETS`: ``default``, ``fast``) with ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}': use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def for_windows(self, n_windows: int) -> "GQSAConfig":
        """This config with the training batch sizes not given (``None``) set for ``n_windows`` calibration
        windows (:func:`auto_batch_size`), and ``e2e_lr_codes`` not given set by :meth:`codes_rule`."""
        auto = {name: auto_batch_size(n_windows) for name in ("bqpo_batch_size", "e2e_batch_size")
                if getattr(self, name) is None}
        if self.e2e_lr_codes is None:
            auto["e2e_lr_codes"] = self.codes_rule(n_windows)[0]
        return replace(self, **auto) if auto else self

    def e2e_steps(self, n_windows: int) -> int:
        """E2E-OQP's optimizer steps with ``n_windows`` calibration windows: its epochs × the steps of an epoch over
        the training windows (those not held out, :func:`gqsa.calib.held_out_count`)."""
        n_train = n_windows - held_out_count(n_windows, self.val_fraction)
        micro = math.ceil(n_train / (self.e2e_batch_size or auto_batch_size(n_windows)))
        return math.ceil(micro / self.e2e_grad_accum) * self.e2e_epochs

    def codes_rule(self, n_windows: int) -> tuple[float, str]:
        """(``e2e_lr_codes``, why) for ``n_windows`` calibration windows: the rate given, else :data:`CODES_LR` when
        E2E-OQP distils (``kd``) over at least :data:`CODES_MIN_STEPS` steps on sparse layers (``sparsity`` > 0 or
        ``target_bits``) of 4 or more bits, else 0 (codes frozen)."""
        if self.e2e_lr_codes is not None:
            return self.e2e_lr_codes, "given"
        if self.stages != "bqpo+e2e":
            return 0.0, "no E2E-OQP"
        if self.e2e_loss != "kd":
            return 0.0, f"auto: codes train only with e2e_loss kd (with {self.e2e_loss} they overfit the calibration text)"
        if self.bits < 4 or (self.sparsity <= 0 and self.target_bits is None):
            return 0.0, (f"auto: codes train only on sparse layers of 4+ bits (measured to gain there; W3 S0 G128 "
                         f"lost), here {self.bits}-bit at sparsity {self.sparsity:g}")
        steps = self.e2e_steps(n_windows)
        if steps >= CODES_MIN_STEPS:
            return CODES_LR, f"auto: {steps} E2E-OQP steps >= {CODES_MIN_STEPS}"
        return 0.0, f"auto: {steps} E2E-OQP steps < {CODES_MIN_STEPS}, too few for the codes to gain"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GQSAConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GQSAConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)
