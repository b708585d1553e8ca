"""One entry point to load a model and its tokenizer: ``load_model(name_or_path, tokenizer=None)``.

* a llama2.c checkpoint file (``*.bin``) -> :func:`gqsa.models.llama2c.load_llama2c`; its tokenizer is
  the ``tokenizer`` argument or a ``tok*.bin`` / ``tokenizer.model`` beside it whose vocabulary size
  matches the model's;
* a folder with ``config.json``, or a Hugging Face hub id (``org/name``) -> ``AutoModelForCausalLM``
  and ``AutoTokenizer`` (never with remote code).

Mistakes a user can make (a wrong path, a folder that is not a model, a file of another kind, a
missing or mismatched tokenizer) raise ``FileNotFoundError`` / ``ValueError`` with a one-line message
naming the path and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..sources import is_hub_id
from .llama2c import load_llama2c, read_llama2c_header
from .tokenizer import load_llama2c_tokenizer

__all__ = ["load_model", "load_tokenizer", "resolve_dtype"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A ``torch.dtype`` from a dtype or its name (``"fp16"``, ``"bfloat16"``, ...); ``"auto"`` is kept."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16, auto") from None


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a llama2.c ``.bin``, a SentencePiece ``.model``, a folder or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            from .gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        if path.suffix in (".bin", ".model"):
            return load_llama2c_tokenizer(path)
        raise ValueError(
            f"{path}: unknown tokenizer file: pass a llama2.c tok*.bin, a SentencePiece .model, or a folder"
        )
    if path.is_dir():
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise ValueError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model): pass --tokenizer PATH")
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if is_hub_id(str(source)):
        try:
            return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
        except OSError as e:
            raise FileNotFoundError(
                f"{source}: tokenizer not found locally or on the Hugging Face hub ({_first_line(e)})"
            ) from e
    raise FileNotFoundError(f"{source}: no such tokenizer file or folder")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tokenizer_beside(path: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """The tokenizer next to a llama2.c checkpoint whose vocabulary size is ``vocab_size`` (a GGUF
    file's own tokenizer)."""
    if path.suffix == ".gguf":
        from .gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    candidates = [p for p in sorted(path.parent.glob("tok*.bin")) if p != path]
    candidates += [p for p in [path.parent / "tokenizer.model"] if p.is_file()]
    if not candidates:
        raise ValueError(f"{path}: no tokenizer beside it (tok*.bin or tokenizer.model): pass --tokenizer PATH")
    sizes = []
    for candidate in candidates:
        try:
            tok = load_llama2c_tokenizer(candidate)
        except ValueError:
            continue
        if len(tok) == vocab_size:
            return tok
        sizes.append(f"{candidate.name}: {len(tok)}")
    raise ValueError(
        f"{path}: no tokenizer beside it has the model's {vocab_size} tokens ({', '.join(sizes) or 'none readable'}): "
        "pass --tokenizer PATH"
    )


def _load_model_file(path: Path, dtype: torch.dtype | str) -> PreTrainedModel:
    """A model from a single file: a GGUF file or a llama2.c checkpoint."""
    if path.suffix == ".gguf":
        from .gguf import load_gguf_model

        return load_gguf_model(path, dtype)
    if path.suffix in (".safetensors", ".pt", ".pth", ".ckpt") or path.name == "config.json":
        raise ValueError(
            f"{path}: a single {path.suffix or path.name} file is not a loadable model: "
            "pass the folder that holds config.json and the weights, a .gguf file or a llama2.c .bin checkpoint"
        )
    if path.suffix != ".bin":
        try:
            read_llama2c_header(path)
        except ValueError:
            raise ValueError(
                f"{path}: unknown model file: pass a llama2.c .bin checkpoint or a Hugging Face model folder"
            ) from None
    return load_llama2c(path, dtype=torch.float32 if dtype == "auto" else dtype)


def _check_folder_config(path: Path) -> None:
    """A local model folder's config.json, before transformers builds anything from it: valid JSON without
    NaN/Infinity, no ``auto_map`` (custom code is never run), types and dimension limits of
    :func:`gqsa.checkpoint.check_model_config`. Raises :class:`gqsa.FormatError` (a ValueError)."""
    from ..checkpoint import refuse_remote_code, check_model_config, read_json

    config = read_json(path / "config.json")  # (symbolic links allowed: a hub cache folder is made of them)
    refuse_remote_code(path, "config.json", config)
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        refuse_remote_code(path, "tokenizer_config.json", read_json(tok_cfg))
    check_model_config(config, path / "config.json")


def _check_finite(model: PreTrainedModel, source) -> None:
    from ..checkpoint import all_finite

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{source}: tensor {name} holds NaN or infinite values; the weights are damaged")


def load_model(
    name_or_path: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; the model is in eval mode on ``device``.

    Args:
        name_or_path: a llama2.c ``.bin`` checkpoint, a Hugging Face model folder, or a hub id.
        tokenizer: where the tokenizer is (llama2.c ``.bin``, SentencePiece ``.model``, folder or hub
            id); by default the model folder / hub id, or the tokenizer beside a llama2.c file.
        dtype: the weights' dtype (a ``torch.dtype``, a name such as ``"bf16"``, or ``"auto"`` for the
            checkpoint's own).
        device: where to put the model.

    Raises:
        FileNotFoundError: nothing at ``name_or_path`` (and not a hub id that could be fetched).
        ValueError: the path is not a model (folder without config.json, file of another kind), or
            no matching tokenizer was found.
    """
    dtype = resolve_dtype(dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        model = _load_model_file(path, dtype)
        if tokenizer is None:
            tok = _tokenizer_beside(path, model.config.vocab_size)
        else:
            tok = load_tokenizer(tokenizer)
            if len(tok) != model.config.vocab_size:
                raise ValueError(
                    f"{tokenizer}: tokenizer has {len(tok)} tokens but {path.name} has {model.config.vocab_size}: "
                    "pass the model's own tokenizer"
                )
    else:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"{path}: is not a model folder: no config.json (for a llama2.c checkpoint pass its .bin file)"
                )
            _check_folder_config(path)
            source: str | Path = path
        elif is_hub_id(str(name_or_path)):
            source = str(name_or_path)
        else:
            raise FileNotFoundError(
                f"{name_or_path}: no such file or folder (and not a Hugging Face hub id like 'org/name')"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
        except OSError as e:
            if path.is_dir():
                raise ValueError(f"{path}: could not load the model ({_first_line(e)})") from e
            raise FileNotFoundError(
                f"{name_or_path}: not a local file or folder, and not loadable from the Hugging Face hub "
                f"({_first_line(e)})"
            ) from e
        except Exception as e:  # damaged files: whatever transformers / safetensors raise, one line
            if isinstance(e, ValueError) and not path.is_dir():
                raise
            raise ValueError(f"{path if path.is_dir() else name_or_path}: could not load the model "
                             f"({type(e).__name__}: {_first_line(e)})") from e
        _check_finite(model, source)
        tok = load_tokenizer(tokenizer if tokenizer is not None else source)
        if len(tok) > model.config.get_text_config().vocab_size:
            raise ValueError(
                f"{tokenizer or source}: tokenizer has {len(tok)} tokens, more than the model's "
                f"{model.config.get_text_config().vocab_size}: pass the model's own tokenizer"
            )
        # fewer: models pad their embedding a little beyond the tokenizer (Qwen2 151665 -> 151936, OPT 50265 ->
        # 50272), never past the next multiple of 1024; more than that is another model's tokenizer
        if tokenizer is not None and model.config.get_text_config().vocab_size > -(-len(tok) // 1024) * 1024:
            raise ValueError(
                f"{tokenizer}: tokenizer has {len(tok)} tokens, far fewer than the model's "
                f"{model.config.get_text_config().vocab_size}: pass the model's own tokenizer"
            )

    model.to(device)
    model.eval()
    gen = model.generation_config
    if gen is not None and gen.pad_token_id is None:
        eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos
    return model, tok


def stored_dtype(model) -> torch.dtype:
    """The dtype the source checkpoint of a loaded ``model`` stores its weights in (the dense tensors of a
    compressed folder keep it): its config.json's ``dtype`` / ``torch_dtype`` (the loaded model's config
    says what it was loaded in, not that), else the dtype of most floating tensors in its safetensors
    headers, else float32 (llama2.c and GGUF files)."""
    stored = (torch.float32, torch.float16, torch.bfloat16)
    name = str(getattr(model.config, "name_or_path", "") or "")
    raw = None
    try:
        if name and Path(name).is_dir():
            raw = json.loads((Path(name) / "config.json").read_text())
        elif name:
            from transformers import AutoConfig

            raw = AutoConfig.from_pretrained(name, trust_remote_code=False).to_dict()
    except Exception:  # noqa: BLE001  (only a default is lost: the model itself loaded)
        raw = None
    d = (raw or {}).get("dtype") or (raw or {}).get("torch_dtype")
    d = getattr(torch, d.removeprefix("torch."), None) if isinstance(d, str) else d
    if d in stored:
        return d
    if name and Path(name).is_dir():
        from collections import Counter

        from safetensors import safe_open

        counts = Counter()
        for f in Path(name).glob("*.safetensors"):
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        counts[h.get_slice(k).get_dtype()] += 1
            except Exception:  # noqa: BLE001
                continue
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        found = [(n, names[k]) for k, n in counts.items() if k in names]
        if found:
            return max(found, key=lambda x: x[0])[1]
    return torch.float32


def load_any(name_or_path, tokenizer=None, *, dtype, device, verify: bool = True):
    """``(model, tokenizer)`` of a GQSA checkpoint folder (validated, ``verify``: its checksums) or of any
    model :func:`load_model` reads (``tokenizer`` is for those)."""
    from .. import checkpoint

    if checkpoint.is_gqsa_folder(name_or_path):
        model, tok = checkpoint.load(name_or_path, device=device, dtype=dtype, verify=verify)
        if tok is None:
            raise ValueError(f"{Path(name_or_path)} has no tokenizer files")
        return model, tok
    return load_model(name_or_path, tokenizer, dtype=dtype, device=device)
