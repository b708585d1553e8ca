"""Compress a model named by a path or hub id into a checkpoint folder: load it, cut the calibration windows,
compress (GQSA through :mod:`gqsa.pipeline`, or a baseline through :mod:`gqsa.baselines`), write the folder
and its report. ``gqsa compress`` and ``gqsa report`` are faces of :func:`compress_to_folder`."""
from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

# the stage options that take the --preset's value unless given (None = not given)
STAGE_OPTIONS = ("val_fraction", "bqpo_epochs", "bqpo_batch_size", "bqpo_lr_weight", "bqpo_lr_scale",
                 "bqpo_lr_zero", "bqpo_patience", "bqpo_gradual", "bqpo_learn_mask", "bqpo_lr_mask", "bqpo_target",
                 "e2e_epochs", "e2e_batch_size",
                 "e2e_grad_accum", "e2e_lr", "e2e_lr_codes", "e2e_loss", "amp", "activation_dtype")
DEFAULT_SEQLEN = 2048  # calibration window length when none is given (capped at the model's context)


def work_folder(out) -> Path:
    """The work folder of a trained run writing ``out``: ``OUT.partial`` (its finished BQPO blocks, for --resume)."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _refuse_out_over_inputs(out: Path, inputs: dict) -> None:
    """``ValueError`` when ``out`` is, or holds, a local input of the run: the folder is written as a whole (with
    ``--overwrite``, replaced), so the model being compressed or its data would be destroyed."""
    target = out.resolve()
    for what, path in inputs.items():
        if not path or not Path(path).exists():
            continue  # hub ids, dataset names, "self"
        src = Path(path).resolve()
        if src == target or target in src.parents:
            raise ValueError(f"--out {out} {'is' if src == target else 'holds'} {what} ({path}): writing the "
                             f"compressed folder there would destroy it; choose another --out")


def gqsa_config(*, bits: int = 4, group_size: int = 16, sparsity: float = 0.5, saliency: str = "hessian",
                allocation: str = "row", quant_init: str = "mse", damp: float = 0.01, mask: str | None = None,
                target_bits: float | None = None, skip=(), seed: int = 0, stages: str = "bqpo+e2e",
                preset: str = "default", resume: bool = False, e2e_train_zero: bool = False,
                grad_checkpointing: bool = True, offload_activations: bool = False,
                quantize_lm_head: int | None = None, **stage_options):
    """The :class:`GQSAConfig` of a compression: the ``preset``, then every option given (``None``: not given)."""
    from .config import GQSAConfig

    unknown = set(stage_options) - set(STAGE_OPTIONS)
    if unknown:
        raise TypeError(f"gqsa_config() got unexpected keyword arguments {sorted(unknown)}")
    given = {k: v for k, v in stage_options.items() if v is not None}
    if e2e_train_zero:
        given["e2e_train_zero"] = True
    if offload_activations:
        given["offload_activations"] = True
    if not grad_checkpointing:
        given["e2e_grad_checkpointing"] = False
    for name, value in (("mask", mask), ("target_bits", target_bits), ("lm_head_bits", quantize_lm_head)):
        if value is not None:
            given[name] = value
    if resume and stages == "oneshot":
        raise ValueError("--resume applies to the trained stages (--stages bqpo or bqpo+e2e)")
    return GQSAConfig.preset(preset, bits=bits, group_size=group_size, sparsity=sparsity, saliency=saliency,
                             allocation=allocation, quant_init=quant_init, damp=damp, skip=list(skip), seed=seed,
                             stages=stages, **given)


def compress_to_folder(model: str, out, *, calib: str, tokenizer: str | None = None, overwrite: bool = False,
                       method: str = "gqsa", bits: int = 4, group_size: int = 16, sparsity: float = 0.5,
                       saliency: str = "hessian", allocation: str = "row", quant_init: str = "mse",
                       damp: float = 0.01, mask: str | None = None, target_bits: float | None = None, skip=(),
                       stages: str = "bqpo+e2e", preset: str = "default", resume: bool = False,
                       e2e_train_zero: bool = False, grad_checkpointing: bool = True,
                       offload_activations: bool = False, quantize_lm_head: int | None = None,
                       pattern: str = "2:4", act_order: bool = False,
                       clip_search: bool = False, prune_bits: int | None = None, blocksize: int = 128,
                       nsamples: int = 128, seqlen: int | None = None, batch_size: int = 8, seed: int = 0,
                       device: str | None = None, dtype: str = "float32", dense_dtype: str = "auto",
                       before_load=None, **stage_options) -> int:
    """Compress ``model`` (hub id, folder, llama2.c ``.bin`` or ``.gguf``) calibrated on ``calib`` and write
    the folder ``out``; the keyword arguments are those of ``gqsa compress`` (``gqsa compress --help``; ``seqlen``
    None: ``DEFAULT_SEQLEN`` capped at the model's context, a longer one given is capped with a warning; the
    stage options of :data:`STAGE_OPTIONS` are ``None`` unless given). ``before_load()`` runs after the
    settings are checked, before the model is read. Returns 0 (the exit status)."""
    from .sources import SELF, check_model_source, check_text_source

    # the checks that need no torch first (a mistyped option or path fails at once, not after the imports)
    if not str(out).strip():
        raise ValueError("--out is empty: name the folder to write")
    out = Path(out)
    _refuse_out_over_inputs(out, {"the model": model, "the calibration text": calib, "the tokenizer": tokenizer})
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if seqlen == 1:
        raise ValueError("--seqlen must be at least 2: a calibration window of one token has nothing to predict")
    if quantize_lm_head is not None and method != "gqsa":
        raise ValueError(f"--quantize-lm-head applies to --method gqsa, not {method}")
    check_model_source(model)
    if calib != SELF:
        check_text_source(calib)

    import torch

    from . import calib as calib_mod
    from . import distributed
    from .checkpoint import is_gqsa_folder
    from .models import load_model
    from .models.loader import stored_dtype
    from .modules import default_device

    default_device(device)  # a device this machine cannot use: said before the model is read
    if Path(model).is_dir() and is_gqsa_folder(model):
        raise ValueError(f"{model} is a compressed checkpoint already (config.json has a quantization_config): "
                         f"compress the original model it was made from")
    config = gqsa_config(bits=bits, group_size=group_size, sparsity=sparsity, saliency=saliency,
                         allocation=allocation, quant_init=quant_init, damp=damp, mask=mask, target_bits=target_bits,
                         skip=skip, seed=seed, stages=stages, preset=preset, resume=resume,
                         e2e_train_zero=e2e_train_zero, grad_checkpointing=grad_checkpointing,
                         offload_activations=offload_activations, quantize_lm_head=quantize_lm_head, **stage_options)
    if before_load is not None:
        before_load()
    t0 = time.time()
    torch.manual_seed(seed)
    loaded, tok = load_model(model, tokenizer, dtype=getattr(torch, dtype))
    source_dtype = stored_dtype(loaded)
    context = getattr(loaded.config, "max_position_embeddings", None)
    if seqlen is None:  # the default: DEFAULT_SEQLEN, capped at the model's context without a word
        seqlen = min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN
    elif context and seqlen > context:
        warnings.warn(f"--seqlen {seqlen} is longer than the model's context ({context} positions): calibrating on "
                      f"windows of {context} tokens", stacklevel=2)
        seqlen = context
    if calib == calib_mod.SELF:
        print(f"sampling {nsamples} calibration windows of {seqlen} tokens from the model itself",
              file=sys.stderr, flush=True)
    # the trained stages hold out the last windows: drawn from the text's tail, which no training window covers
    held_out = config.val_fraction if method == "gqsa" and config.trained else 0.0
    tokens = calib_mod.calibration_tokens(calib, tok, nsamples, seqlen, seed, model=loaded, val_fraction=held_out)
    dense = source_dtype if dense_dtype == "auto" else getattr(torch, dense_dtype)
    about = {"model": str(model), "tokenizer": str(tokenizer) if tokenizer else None, "calib": calib, "seed": seed,
             "compute_dtype": dtype, "dense_dtype": dense, "batch_size": batch_size, "overwrite": overwrite}
    if method != "gqsa":
        from .baselines.runner import BaselineConfig

        baseline = BaselineConfig(method=method, bits=bits, group_size=group_size, act_order=act_order,
                                  quant_init="mse" if clip_search else "minmax", pattern=pattern, sparsity=sparsity,
                                  damp=damp, blocksize=blocksize, skip=list(skip or []), prune_bits=prune_bits)
        return _baseline_to_folder(loaded, tok, tokens, default_device(device), baseline, out, about)
    dev = default_device(device)
    if distributed.launched():  # torchrun: data-parallel trained stages, rank 0 writes
        if not config.trained:
            raise ValueError("--stages oneshot has nothing to split across processes; run it without torchrun")
        dev = distributed.setup(device)
    def reload():  # E2E-OQP's teacher, read again when the stage starts (not a copy held through BQPO)
        return load_model(model, tokenizer, dtype=getattr(torch, dtype))[0]

    try:
        return _gqsa_to_folder(loaded, tok, tokens, dev, config, out, dict(about, preset=preset, resume=resume), t0,
                               reload)
    finally:
        distributed.teardown()


def _gqsa_to_folder(model, tok, tokens, device, config, out: Path, about: dict, t0: float, reload=None) -> int:
    from . import checkpoint, distributed, report
    from .pipeline import compress_model

    config = config.for_windows(tokens.shape[0])  # the batch sizes the run uses, recorded in its report
    workdir = work_folder(out)
    if config.trained and workdir.exists() and about["overwrite"] and not about["resume"] and distributed.is_main():
        shutil.rmtree(workdir)
    distributed.barrier()
    stats = {}
    packed = compress_model(model, config, tokens, device=device, batch_size=about["batch_size"],
                            workdir=workdir if config.trained else None, resume=about["resume"], stats=stats,
                            teacher=reload)
    if not distributed.is_main():
        return 0
    model.to(about["dense_dtype"])
    rep = report.compression_report(model, config, packed, stats, tokens, about["batch_size"], device,
                                    time.time() - t0)
    rep["calibration"].update(source=str(about["calib"]), seed=about["seed"])
    rep.update({
        "preset": about["preset"],
        "resumed": bool(about["resume"] and any(b.get("resumed") for b in stats.get("bqpo", []))),
        "model": about["model"], "tokenizer": about["tokenizer"],
        "world_size": distributed.world_size(),
        **({"simulated_ranks": distributed.simulated_ranks()} if distributed.simulated_ranks() > 1 else {}),
        "compute_dtype": about["compute_dtype"], "dense_dtype": str(about["dense_dtype"]),
    })
    checkpoint.save(model, out, tok, rep, overwrite=about["overwrite"], extra_quant_config={"sparsity": config.sparsity})
    if config.trained:
        shutil.rmtree(workdir, ignore_errors=True)  # the run is complete: its work folder is not needed
    t = rep["totals"]
    print(f"wrote {out}: {t['compressed_layers']} layers, sparsity {t['sparsity']:.3f}, "
          f"{t['bits_per_weight']:.3f} bits/weight, {rep['seconds']:.0f} s")
    return 0


def _baseline_to_folder(model, tok, tokens, device, config, out: Path, about: dict) -> int:
    """``gqsa compress --method rtn|gptq|wanda|sparsegpt|magnitude``: compress, write ``out``."""
    from . import checkpoint, report
    from .baselines.runner import compress_model_baseline, save_dense

    t0 = time.time()
    result = compress_model_baseline(model, config, tokens, device=device, batch_size=about["batch_size"])
    model.to(about["dense_dtype"])
    rep = {
        "method": config.method, "stage": "oneshot", "setting": config.setting(), "config": config.to_dict(),
        "format": "gqsa-packed" if config.packed else "dense-with-zeros",
        "model": about["model"], "tokenizer": about["tokenizer"],
        "calibration": ({"source": str(about["calib"]), "nsamples": int(tokens.shape[0]),
                         "seqlen": int(tokens.shape[1]), "seed": about["seed"]} if config.needs_calibration else None),
        "device": str(device), "compute_dtype": about["compute_dtype"], "dense_dtype": str(about["dense_dtype"]),
        "seconds": round(time.time() - t0, 1), "environment": report.environment(),
        "layers": report.layer_rows(result.packed) if config.packed else result.layers,
        "totals": result.totals, "evaluations": [],
    }
    if config.packed:
        checkpoint.save(model, out, tok, rep, overwrite=about["overwrite"],
                        extra_quant_config={"sparsity": 0.0, "baseline": config.method})
    else:
        save_dense(model, out, tok, rep, overwrite=about["overwrite"])
    t = result.totals
    print(f"wrote {out} ({rep['format']}): {config.setting()}, {t['compressed_layers']} layers, "
          f"sparsity {t['sparsity']:.3f}, {t['bits_per_weight']:.3f} bits/weight, {rep['seconds']:.0f} s")
    return 0
