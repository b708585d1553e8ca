"""GQSA checkpoint folders: save (atomic) and load (validated) a whole compressed model.

A folder holds ``config.json`` (the model's own config plus ``quantization_config``),
``model.safetensors`` (or shards with ``model.safetensors.index.json``), tokenizer files,
``generation_config.json`` and ``gqsa_report.json``. No pickle anywhere.

``quantization_config`` = ``{"quant_method": "gqsa", "format_version": 1, "bits", "group_size",
"sparsity", "zero_point": "int"|"float", "layers": {name: {"shape": [N, K], "bits", "group_size"}}}``;
the per-layer entries make the folder self-describing (``inspect`` needs no model code) and allow
per-layer settings.

Loading treats a folder as untrusted input. Every problem raises :class:`~gqsa.format.FormatError`
(one family, no subclasses) whose message names the file and the problem:

* checksums: ``gqsa_report.json`` records the sha256 of every file of the folder (itself and
  :data:`UNCHECKED` names such as README.md excepted); with ``verify=True`` (the default) a missing,
  unreadable or incomplete report is refused, so damaging the folder cannot switch verification off
  (only ``verify=False`` / ``--no-verify`` does). Folders whose report lists only the .safetensors files
  (gqsa before this check) are refused too: :func:`refresh_checksums` re-records them;
* every JSON file must parse into an object, without NaN/Infinity or numbers that overflow to them,
  nested at most :data:`MAX_JSON_DEPTH` deep; ``config.json`` values have the types of the model's config
  class, positive dimensions under :data:`LIMITS`, and a layer count equal to the checkpoint's; a
  ``config.json`` or ``tokenizer_config.json`` with ``auto_map`` (custom code) is refused, and transformers
  is always called with ``trust_remote_code=False``;
* files are read only from the folder itself: a shard index naming a path, or a symbolic link leading
  out of the folder, is refused;
* tensors: every packed layer passes :func:`gqsa.format.validate`; every dense tensor has the shape of
  the model's parameter, a float dtype, and only finite values; tensors the model does not have, or
  parameters the folder lacks, are refused; all of this before any dtype cast or allocation of the model;
* a temporary folder of an interrupted save (``.NAME.*.tmp``, marked with ``.gqsa-incomplete``) is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint_checks import (  # noqa: F401  (public names of the folder checks, re-exported)
    DENSE_DTYPES, FORMAT_VERSION, LIMITS, MAX_JSON_BYTES, MAX_JSON_DEPTH, check_folder, inside_folder,
    regular_file, shard_names, third_party, all_finite, check_companion_files, check_model_config,
    check_quantization_config, read_json, read_quantization_config, refuse_remote_code, validated_layers,
    verify_checksums)
from .folder_io import (  # noqa: F401  (re-exported)
    INCOMPLETE, REPORT, UNCHECKED, atomic_folder, checksummed_files, remove_stale_temporaries, sha256, write_json_atomic, write_report)
from .format import TENSOR_NAMES, FormatError, PackedLinear
from .modules import default_device, replace_submodule
from .nn import GQSALinear


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


def refresh_checksums(folder) -> None:
    """Record the current sha256 of every file of ``folder`` in its ``gqsa_report.json`` (after editing
    a file on purpose; the rest of the report is kept)."""
    folder = Path(folder)
    report = read_json(folder / REPORT, folder) if (folder / REPORT).is_file() else {}
    write_report(folder, report)


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


# ----------------------------------------------------------------------------------------------------
# reading an untrusted folder


def read_tensors(folder, verify: bool = True, origin: dict | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder; a truncated, tampered or missing file raises FormatError.
    ``origin`` (a dict) receives tensor name -> the file it came from."""
    folder = check_folder(folder)
    for entry in folder.iterdir():
        inside_folder(folder, entry)
    shards, weight_map = shard_names(folder)
    if verify:
        verify_checksums(folder, shards)
    tensors: dict[str, torch.Tensor] = {}
    where = {} if origin is None else origin
    for f in shards:
        path = regular_file(folder, f, "shard")
        try:
            loaded = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
            raise FormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        for name, t in loaded.items():
            if name in tensors:
                raise FormatError(f"{path}: tensor {name} is also in {where[name].name}")
            if weight_map is not None and weight_map.get(name) != f:
                raise FormatError(f"{path} holds {name}, which model.safetensors.index.json places in "
                                  f"{weight_map.get(name)!r}")
            if t.is_floating_point() and not all_finite(t):
                raise FormatError(f"{path}: tensor {name} holds NaN or infinite values")
            tensors[name] = t
            where[name] = path
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise FormatError(f"{folder / 'model.safetensors.index.json'} lists {absent[0]} in "
                              f"{weight_map[absent[0]]}, which does not hold it")
    return tensors


def packed_layers(folder, verify: bool = True) -> dict[str, PackedLinear]:
    """The validated packed layers of a checkpoint folder (no model code needed)."""
    config, qc = read_quantization_config(folder)
    origin = {}
    tensors = read_tensors(folder, verify, origin)
    layers = validated_layers(folder, qc, tensors, origin)
    check_model_config(config, Path(folder) / "config.json", tensors)
    return layers


def _dense_dtype_arg(dtype):
    """``dtype`` of :func:`load` as a torch dtype among ``DENSE_DTYPES`` (a name such as ``"bfloat16"`` too), or
    None."""
    if dtype is None:
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in DENSE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in DENSE_DTYPES)
        raise ValueError(f"dtype {dtype!r}: the dense tensors load as one of {names} (or None: as stored)")
    return resolved


def load(folder, device="cpu", dtype: torch.dtype | None = None, verify: bool = True):
    """Load a GQSA checkpoint folder into a transformers model with :class:`GQSALinear` layers.

    Returns ``(model, tokenizer)`` (tokenizer ``None`` if the folder has none). Everything is checked
    (see the module's docstring) before the model is built on the meta device, so nothing dense is
    allocated for the compressed linears and nothing at all for a folder that is refused. ``dtype``:
    the dense tensors' dtype (a ``torch.dtype`` or its name; default: as stored); the packed tensors keep theirs.
    ``device`` is checked first (one ``ValueError`` for a device this machine has not got).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    device = default_device(device) if device is not None else None  # (None: where it is built, the CPU)
    dtype = _dense_dtype_arg(dtype)
    folder = Path(folder)
    config_dict, qc = read_quantization_config(folder)
    origin: dict = {}
    tensors = read_tensors(folder, verify, origin)
    validated_layers(folder, qc, tensors, origin)
    cfg_path = folder / "config.json"
    check_model_config(config_dict, cfg_path, tensors)
    check_companion_files(folder, config_dict)
    gen_path = folder / "generation_config.json"

    config = third_party(f"{cfg_path}: transformers cannot read this config", AutoConfig.from_pretrained, folder,
                          trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    stored = _dense_dtype(tensors, qc)
    target = dtype or stored
    with torch.device("meta"):
        model = third_party(f"{cfg_path}: transformers cannot build a {config_dict['model_type']} model from it",
                             AutoModelForCausalLM.from_config, config, dtype=target, trust_remote_code=False)
    for name, meta in qc["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{cfg_path}: compressed layer {name} does not exist in a {config.model_type} "
                              f"model") from None
        if not isinstance(old, torch.nn.Linear):
            raise FormatError(f"{cfg_path}: compressed layer {name} is a {type(old).__name__}, not a linear layer")
        n, k = meta["shape"]
        if (old.out_features, old.in_features) != (n, k):
            raise FormatError(f"{cfg_path}: layer {name} is [{n}, {k}] in quantization_config but "
                              f"[{old.out_features}, {old.in_features}] in the model config")
        replace_submodule(model, name, GQSALinear(k, n, meta["bits"], meta["group_size"], bias=old.bias is not None,
                                                  float_zeros=qc.get("zero_point") == "float", dtype=old.weight.dtype))
    expected = model.state_dict()
    dense = {}
    for name, t in tensors.items():
        if name.rpartition(".")[2] in TENSOR_NAMES and name.rpartition(".")[0] in qc["layers"]:
            dense[name] = t
            continue
        want = expected.get(name)
        if want is None:
            raise FormatError(f"{origin[name]}: tensor {name} is not a parameter of a {config.model_type} model "
                              f"with this config.json")
        if tuple(t.shape) != tuple(want.shape):
            raise FormatError(f"{origin[name]}: tensor {name} has shape {list(t.shape)}, but config.json makes "
                              f"it {list(want.shape)}")
        if want.is_floating_point():
            if t.dtype not in DENSE_DTYPES:
                raise FormatError(f"{origin[name]}: tensor {name} has dtype {t.dtype}; dense tensors are "
                                  f"float32, float16 or bfloat16")
            if t.dtype != stored:  # a checkpoint stores its dense tensors in one dtype
                raise FormatError(f"{origin[name]}: tensor {name} has dtype {t.dtype} but the other dense "
                                  f"tensors {stored}; the file was altered")
            t = t.to(target)
        elif t.dtype != want.dtype:
            raise FormatError(f"{origin[name]}: tensor {name} has dtype {t.dtype}, expected {want.dtype}")
        dense[name] = t
    result = model.load_state_dict(dense, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if _is_meta(model, k)]
    if missing or result.unexpected_keys:
        raise FormatError(f"{folder}: tensors do not match the model: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    _materialize_buffers(model, limit=sum(t.numel() for t in tensors.values()) + (1 << 20), where=cfg_path)
    model.config.quantization_config = qc
    model.to(device).eval()
    if gen_path.is_file():
        model.generation_config = third_party(f"{gen_path} is not a valid generation config",
                                               GenerationConfig.from_pretrained, folder)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tok_files = ", ".join(f.name for f in sorted(folder.glob("tok*")) + sorted(folder.glob("special_tokens*")))
        tokenizer = third_party(f"{folder}: its tokenizer files ({tok_files}) cannot be loaded",
                                 AutoTokenizer.from_pretrained, folder, trust_remote_code=False)
        # settings of tokenizer_config.json are used only when text is encoded: try it once here
        third_party(f"{folder}: its tokenizer ({tok_files}) cannot encode text; the files are damaged",
                     lambda: tokenizer.decode(tokenizer("Hello, world.").input_ids))
        if len(tokenizer) > model.config.get_text_config().vocab_size:
            raise FormatError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                              f"{model.config.get_text_config().vocab_size}; the tokenizer files do not belong here")
    return model, tokenizer


def _dense_dtype(tensors, qc) -> torch.dtype:
    packed = {f"{n}.{t}" for n in qc["layers"] for t in TENSOR_NAMES}
    for name, t in tensors.items():
        if name not in packed and t.dtype in DENSE_DTYPES:
            return t.dtype
    return torch.float16


def _is_meta(model, key: str) -> bool:
    try:
        return model.get_parameter(key).is_meta
    except AttributeError:
        return model.get_buffer(key).is_meta


def _materialize_buffers(model, limit: int | None = None, where="config.json") -> None:
    """Non-persistent buffers (e.g. RoPE's inv_freq) are still on meta: make them and recompute
    them with transformers' own initializer (at most ``limit`` values in all: a config cannot make
    the loader allocate more than the checkpoint holds)."""
    todo = sum(b.numel() for b in model.buffers() if b.is_meta)
    if limit is not None and todo > limit:
        raise FormatError(f"{where}: the model it describes needs {todo:,} buffer values beyond the checkpoint's "
                          f"tensors; the config is damaged")
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[name] = torch.empty_like(b, device="cpu")
            model._init_weights(module)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise FormatError(f"{where}: could not materialize {left[:5]} when loading the checkpoint")
    bad = [n for n, b in model.named_buffers() if b.is_floating_point() and not bool(torch.isfinite(b).all())]
    if bad:
        raise FormatError(f"{where}: the config makes buffer {bad[0]} non-finite (NaN or infinity)")


def is_gqsa_folder(folder) -> bool:
    """A folder whose config.json names a quantization method (a malformed one is refused by the
    GQSA loader with a precise message; a plain model folder goes to the ordinary loader)."""
    try:
        return "quantization_config" in json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, RecursionError, TypeError):  # the loaders say what is wrong with it
        return False
