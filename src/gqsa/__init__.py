"""gqsa: GQSA — group quantization + group sparsity for large language models.

Public API::

    from gqsa import GQSAConfig, compress, load, save
    model, tok = gqsa.models.load_model("path/or/hub-id")
    tokens = gqsa.calib.calibration_tokens("wikitext2", tok, nsamples=128, seqlen=2048, val_fraction=0.1)
    compress(model, GQSAConfig(bits=4, group_size=16, sparsity=0.5), tokens)   # one-shot + BQPO + E2E-OQP
    # compress(model, GQSAConfig.preset("fast", stages="bqpo"), tokens)       # fewer epochs, no E2E
    save(model, "out-folder", tok)
    model, tok = load("out-folder")
    # or, after `import gqsa`: transformers.AutoModelForCausalLM.from_pretrained("out-folder")
"""
from __future__ import annotations

import sys as _sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import GQSAConfig


# Imported on first use (PEP 562), so that `gqsa --help` and `gqsa --version` do not load torch.
_LAZY = {"load": ".checkpoint", "GQSAConfig": ".config", "FormatError": ".format",
         "PackedLinear": ".format", "GQSALinear": ".nn"}
_SUBMODULES = ("allocation", "baselines", "calib", "checkpoint", "cli", "config", "distributed", "engine", "eval", "format",
               "integrations", "kernels", "models", "nn", "pipeline", "prune", "quant", "report", "report_matrix",
               "runtime", "stages")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'gqsa' has no attribute '{name}'")


def _register_with_transformers():
    """Register quant_method "gqsa" with transformers (``AutoModelForCausalLM.from_pretrained(folder)``
    then loads a GQSA folder): now if transformers' quantizers are loaded already, else as soon as
    they are (an import hook), so that ``import gqsa`` itself stays light."""
    if "transformers.quantizers" in _sys.modules:
        from .integrations import register

        register()
        return
    import importlib.abc
    import importlib.util

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers.quantizers":
                return None
            _sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                from .integrations import register

                register()

            spec.loader.exec_module = exec_module
            return spec

    if not any(type(f).__name__ == "_Hook" and getattr(f, "__module__", "") == __name__ for f in _sys.meta_path):
        _sys.meta_path.insert(0, _Hook())


_register_with_transformers()


def compress(model, config: GQSAConfig, calib_tokens, device=None, batch_size: int = 8, progress: bool = True,
             *, workdir=None, resume: bool = False, stats: dict | None = None, log=None):
    """Compress ``model`` in place with GQSA calibrated on ``calib_tokens`` ``[n, T]``, through the stages
    of ``config.stages`` (``oneshot``, ``bqpo`` or ``bqpo+e2e``, the default); returns the model (its
    compressed linears are now :class:`GQSALinear`).

    Trained stages: the last ``config.val_fraction`` of the windows are held out for early stopping
    (``calib.calibration_tokens(…, val_fraction=config.val_fraction)`` draws them from text that no training
    window covers);
    ``workdir`` receives each finished BQPO block so that ``resume=True`` continues a killed run
    (bitwise the same result); ``stats`` (a dict) receives the per-block and per-epoch losses, times and
    peak memory; ``log`` receives one line per block / epoch.

    The settings, calibration shape, stage statistics, time and per-layer storage are kept on the
    model as ``model.gqsa_report``: :func:`save` writes them to ``gqsa_report.json``.
    """
    import time

    from . import report
    from .pipeline import compress_model

    t0 = time.time()
    stats = {} if stats is None else stats
    packed = compress_model(model, config, calib_tokens, device=device, batch_size=batch_size, progress=progress,
                            workdir=workdir, resume=resume, stats=stats, log=log)
    model.gqsa_report = {**report.compression_report(model, config, packed, stats, calib_tokens, batch_size,
                                                     device or next(model.parameters()).device,
                                                     time.time() - t0), "api": "gqsa.compress"}
    return model


def save(model, folder, tokenizer=None, report: dict | None = None, overwrite: bool = False, **kwargs):
    """:func:`gqsa.checkpoint.save`; without ``report``, the one :func:`compress` kept on the model
    (settings, calibration, stages, storage) goes to ``gqsa_report.json``."""
    from .checkpoint import save as _save

    if report is None and isinstance(getattr(model, "gqsa_report", None), dict):
        report = dict(model.gqsa_report)
    return _save(model, folder, tokenizer, report, overwrite=overwrite, **kwargs)


__all__ = ["GQSAConfig", "GQSALinear", "PackedLinear", "FormatError", "compress", "load", "save"]
__version__ = "0.1.0"
