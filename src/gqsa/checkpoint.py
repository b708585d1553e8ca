"""GQSA checkpoint folders: save (atomic) and load (validated) a whole compressed model.

A folder holds ``config.json`` (the model's own config plus ``quantization_config``),
``model.safetensors`` (or shards with ``model.safetensors.index.json``), tokenizer files,
``generation_config.json`` and ``gqsa_report.json``. No pickle anywhere.

``quantization_config`` = ``{"quant_method": "gqsa", "format_version": 1, "bits", "group_size",
"sparsity", "zero_point": "int"|"float", "layers": {name: {"shape": [N, K], "bits", "group_size"}}}``;
the per-layer entries make the folder self-describing (``inspect`` needs no model code) and allow
per-layer settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .format import TENSOR_NAMES, FormatError, PackedLinear
from .nn import GQSALinear

FORMAT_VERSION = 1
REPORT = "gqsa_report.json"


def quantization_config(model, extra: dict | None = None) -> dict:
    layers = {name: {"shape": [m.out_features, m.in_features], "bits": m.bits, "group_size": m.group_size}
              for name, m in model.named_modules() if isinstance(m, GQSALinear)}
    if not layers:
        raise ValueError("the model has no GQSALinear layers: compress it before saving")
    first = next(m for m in model.modules() if isinstance(m, GQSALinear))
    qc = {"quant_method": "gqsa", "format_version": FORMAT_VERSION, "bits": first.bits,
          "group_size": first.group_size, "zero_point": "float" if first.packed.float_zeros else "int",
          "layers": layers}
    qc.update(extra or {})
    return qc


def _unique_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (the first name of a shared tensor is kept)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_folder(folder, overwrite: bool = False):
    """Yield a temporary sibling folder of ``folder`` to write into; when the block ends without an
    exception it replaces ``folder``, otherwise it is removed (a half-written ``folder`` never exists)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose another --out or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if folder.exists():
            trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(trash)
            tmp.rename(folder)
            shutil.rmtree(trash)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_report(folder: Path, report: dict | None) -> None:
    """``gqsa_report.json`` in ``folder``, with the sha256 of every safetensors file there."""
    report = dict(report or {})
    report["files"] = {f.name: sha256(f) for f in sorted(folder.glob("*.safetensors"))}
    (folder / REPORT).write_text(json.dumps(report, indent=2))


def save(model, folder, tokenizer=None, report: dict | None = None, overwrite: bool = False,
         max_shard_size: str = "5GB", extra_quant_config: dict | None = None) -> Path:
    """Write a compressed model to ``folder`` atomically: everything goes to a temporary sibling
    folder first, which is renamed into place only when complete."""
    folder = Path(folder)
    for name, m in model.named_modules():
        if isinstance(m, GQSALinear):
            m.packed.validate(name)
    with atomic_folder(folder, overwrite) as tmp:
        state = _unique_state_dict(model)
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config(model, extra_quant_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report)
    return folder


def check_quantization_config(qc: dict, where: str = "quantization_config") -> None:
    """Check a ``quantization_config`` dict (of a folder, or of a hub checkpoint, which has no local
    folder to read): GQSA's quant_method, a supported format version, a well-formed layer map."""
    if qc.get("quant_method") != "gqsa":
        raise FormatError(f"{where}: quant_method '{qc.get('quant_method')}' is not 'gqsa'; "
                          f"load it with the library that wrote it")
    if qc.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{where}: GQSA format version {qc.get('format_version')} is not supported "
                          f"(this gqsa reads version {FORMAT_VERSION}); upgrade gqsa")
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise FormatError(f"{where}: quantization_config lists no compressed layers")
    for name, meta in layers.items():
        try:
            _n, _k = (int(v) for v in meta["shape"])  # exactly two integers
            int(meta["bits"]), int(meta["group_size"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{where}: quantization_config entry of {name} needs shape, bits and "
                              f"group_size") from None


def read_quantization_config(folder) -> tuple[dict, dict]:
    """(config.json as a dict, its validated ``quantization_config``) of a checkpoint folder."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise FormatError(f"{folder} is a file, not a GQSA checkpoint folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{folder} is not a model folder: it has no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path} is not valid JSON ({e})") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise FormatError(f"{folder} is not a GQSA checkpoint: config.json has no quantization_config "
                          f"(an uncompressed model? compress it with `gqsa compress`)")
    check_quantization_config(qc, str(folder))
    return config, qc


def read_tensors(folder, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder; a truncated, tampered or missing file raises FormatError."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FormatError(f"{folder} has no model.safetensors")
    recorded = {}
    if verify and (folder / REPORT).is_file():
        recorded = json.loads((folder / REPORT).read_text()).get("files", {})
    tensors = {}
    for f in files:
        path = folder / f
        if not path.is_file():
            raise FormatError(f"{folder}: shard {f} is missing")
        if f in recorded and sha256(path) != recorded[f]:
            raise FormatError(f"{path}: checksum does not match {REPORT}; the file was modified or is corrupt")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def packed_layers(folder, verify: bool = True) -> dict[str, PackedLinear]:
    """The validated packed layers of a checkpoint folder (no model code needed)."""
    _, qc = read_quantization_config(folder)
    return _validated_layers(folder, qc, read_tensors(folder, verify))


def _validated_layers(folder, qc: dict, tensors: dict[str, torch.Tensor]) -> dict[str, PackedLinear]:
    out = {}
    for name, meta in qc["layers"].items():
        missing = [t for t in TENSOR_NAMES if f"{name}.{t}" not in tensors]
        if missing:
            raise FormatError(f"{folder}: layer {name} lacks tensor(s) {', '.join(missing)}")
        try:
            shape, bits, group_size = tuple(meta["shape"]), meta["bits"], meta["group_size"]
        except (KeyError, TypeError):
            raise FormatError(f"{folder}: quantization_config entry of {name} needs shape, bits and group_size")
        p = PackedLinear(**{t: tensors[f"{name}.{t}"] for t in TENSOR_NAMES}, shape=shape, bits=bits,
                         group_size=group_size)
        p.validate(name)
        out[name] = p
    return out


def load(folder, device="cpu", dtype: torch.dtype | None = None, verify: bool = True):
    """Load a GQSA checkpoint folder into a transformers model with :class:`GQSALinear` layers.

    Returns ``(model, tokenizer)`` (tokenizer ``None`` if the folder has none). The model is built
    on the meta device, so nothing dense is allocated for the compressed linears.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = Path(folder)
    _, qc = read_quantization_config(folder)
    tensors = read_tensors(folder, verify)
    _validated_layers(folder, qc, tensors)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or _dense_dtype(tensors, qc))
    for name, meta in qc["layers"].items():
        parent_name, _, child = name.rpartition(".")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{folder}: compressed layer {name} does not exist in a {config.model_type} model")
        n, k = meta["shape"]
        if (old.out_features, old.in_features) != (n, k):
            raise FormatError(f"{folder}: layer {name} is [{n}, {k}] in quantization_config but "
                              f"[{old.out_features}, {old.in_features}] in the model config")
        setattr(model.get_submodule(parent_name), child,
                GQSALinear(k, n, meta["bits"], meta["group_size"], bias=old.bias is not None,
                           float_zeros=qc.get("zero_point") == "float", dtype=old.weight.dtype))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if _is_meta(model, k)]
    if missing or result.unexpected_keys:
        raise FormatError(f"{folder}: tensors do not match the model: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    _materialize_buffers(model)
    model.config.quantization_config = qc
    model.to(device).eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _dense_dtype(tensors, qc) -> torch.dtype:
    packed = {f"{n}.{t}" for n in qc["layers"] for t in TENSOR_NAMES}
    for name, t in tensors.items():
        if name not in packed and t.is_floating_point():
            return t.dtype
    return torch.float16


def _is_meta(model, key: str) -> bool:
    try:
        return model.get_parameter(key).is_meta
    except AttributeError:
        return model.get_buffer(key).is_meta


def _materialize_buffers(model) -> None:
    """Non-persistent buffers (e.g. RoPE's inv_freq) are still on meta: make them and recompute
    them with transformers' own initializer."""
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[name] = torch.empty_like(b, device="cpu")
            model._init_weights(module)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise FormatError(f"could not materialize {left[:5]} when loading the checkpoint")
