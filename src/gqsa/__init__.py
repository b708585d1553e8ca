"""gqsa: GQSA — group quantization + group sparsity for large language models.

Public API::

    from gqsa import GQSAConfig, compress, load, save
    model, tok = gqsa.models.load_model("path/or/hub-id")
    tokens = gqsa.calib.calibration_tokens("wikitext2", tok, nsamples=128, seqlen=2048)
    compress(model, GQSAConfig(bits=4, group_size=16, sparsity=0.5), tokens)   # one-shot + BQPO + E2E-OQP
    # compress(model, GQSAConfig.preset("fast", stages="bqpo"), tokens)       # fewer epochs, no E2E
    save(model, "out-folder", tok)
    model, tok = load("out-folder")
    # or, after `import gqsa`: transformers.AutoModelForCausalLM.from_pretrained("out-folder")
"""
from .checkpoint import load, save
from .config import GQSAConfig
from .format import FormatError, PackedLinear
from .nn import GQSALinear
from . import integrations  # noqa: F401,E402  (registers quant_method "gqsa" with transformers)


def compress(model, config: GQSAConfig, calib_tokens, device=None, batch_size: int = 8, progress: bool = True,
             *, workdir=None, resume: bool = False, stats: dict | None = None, log=None):
    """Compress ``model`` in place with GQSA calibrated on ``calib_tokens`` ``[n, T]``, through the stages
    of ``config.stages`` (``oneshot``, ``bqpo`` or ``bqpo+e2e``, the default); returns the model (its
    compressed linears are now :class:`GQSALinear`).

    Trained stages: the last ``config.val_fraction`` of the windows are held out for early stopping;
    ``workdir`` receives each finished BQPO block so that ``resume=True`` continues a killed run
    (bitwise the same result); ``stats`` (a dict) receives the per-block and per-epoch losses, times and
    peak memory; ``log`` receives one line per block / epoch.
    """
    from .pipeline import compress_model

    compress_model(model, config, calib_tokens, device=device, batch_size=batch_size, progress=progress,
                   workdir=workdir, resume=resume, stats=stats, log=log)
    return model


__all__ = ["GQSAConfig", "GQSALinear", "PackedLinear", "FormatError", "compress", "load", "save"]
__version__ = "0.1.0"
