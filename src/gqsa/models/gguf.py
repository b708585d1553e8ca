"""GGUF model files (llama.cpp): ``load_gguf(path)`` → a dequantized Hugging Face model and its tokenizer.

The loading is transformers' own (``from_pretrained(folder, gguf_file=NAME)``, which needs the
``gguf`` and ``accelerate`` packages): every tensor is dequantized to float (Q4_1, Q8_0, … → the
values the file's quantizer stands for), the llama.cpp row order of the q/k projections is undone,
and the tokenizer (vocabulary, merges, special tokens, chat template) is rebuilt from the file's
metadata. The result is an ordinary model: the GGUF ``quantization_config`` that transformers
attaches is removed, so a compressed checkpoint written from it is a plain GQSA folder.

Only architectures transformers can read from GGUF load (llama, mistral, qwen2, …); a file that is
not GGUF, or a missing package, raises a one-line ``ValueError``.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["is_gguf", "load_gguf", "load_gguf_model", "load_gguf_tokenizer"]

_MAGIC = b"GGUF"
_NEEDS = "reading GGUF files needs the 'gguf' and 'accelerate' packages: pip install gguf accelerate"


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def _check(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if not is_gguf(path):
        raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF without it)
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(f"{path}: {_NEEDS}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_gguf_model(path: str | Path, dtype: torch.dtype | str = torch.float32):
    """The dequantized model of a GGUF file, in ``dtype`` (``"auto"`` = float32), eval mode, CPU."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    _check(path)
    dtype = torch.float32 if dtype == "auto" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: could not load the GGUF model ({_first_line(e)})") from e
    # what transformers attaches for GGUF is not a quantization of the model as loaded (it is dense float)
    for obj in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    model.config.name_or_path = str(path)
    model.eval()
    return model


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file's metadata."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    _check(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: could not read the tokenizer of the GGUF file ({_first_line(e)})") from e


def load_gguf(path: str | Path, dtype: torch.dtype | str = torch.float32):
    """``(model, tokenizer)`` of a GGUF file."""
    return load_gguf_model(path, dtype), load_gguf_tokenizer(path)
