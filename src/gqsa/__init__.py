"""gqsa: GQSA — group quantization + group sparsity for large language models.

Public API::

    from gqsa import GQSAConfig, compress, load, save
    model, tok = gqsa.models.load_model("path/or/hub-id")
    tokens = gqsa.calib.calibration_tokens("wikitext2", tok, nsamples=128, seqlen=2048)
    compress(model, GQSAConfig(bits=4, group_size=16, sparsity=0.5), tokens)
    save(model, "out-folder", tok)
    model, tok = load("out-folder")
"""
from . import compress as _pipeline  # noqa: F401  (imported first: the function below takes the name)
from .checkpoint import load, save
from .config import GQSAConfig
from .format import FormatError, PackedLinear
from .nn import GQSALinear


def compress(model, config: GQSAConfig, calib_tokens, device=None, batch_size: int = 8, progress: bool = True):
    """Compress ``model`` in place with GQSA calibrated on ``calib_tokens`` ``[n, T]``; returns the model
    (its compressed linears are now :class:`GQSALinear`)."""
    from .compress import compress_model

    compress_model(model, config, calib_tokens, device=device, batch_size=batch_size, progress=progress)
    return model


__all__ = ["GQSAConfig", "GQSALinear", "PackedLinear", "FormatError", "compress", "load", "save"]
__version__ = "0.1.0"
