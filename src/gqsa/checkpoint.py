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

import hashlib
import json
import math
import os
import re
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
INCOMPLETE = ".gqsa-incomplete"  # marker file of a folder that is still being written
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
# upper bounds of config.json dimensions, checked before any model is built (the largest public
# LLaMA-family models use 126 layers, a 256k vocabulary, 53248 intermediate features)
LIMITS = {"num_hidden_layers": 1024, "vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
          "max_position_embeddings": 1 << 28}
# files a folder may hold without a checksum (nothing reads them); everything else must be listed
UNCHECKED = re.compile(r"^(README.*|LICEN[CS]E.*|NOTICE.*|\.gitattributes|.*\.md|gqsa_report\.json.*)$")
_SHARD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary siblings ``.NAME.PID.*.tmp`` / ``.NAME.old-PID`` that a killed save of
    ``folder`` left behind (only those whose process is gone); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.(?:(\d+)\..*\.tmp|old-(\d+))$")
    for p in folder.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1) or m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_folder(folder, overwrite: bool = False):
    """Yield a temporary sibling folder of ``folder`` to write into; when the block ends without an
    exception its files are given the usual modes (0644 under umask 022) and fsync'ed, and it replaces
    ``folder``; otherwise it is removed (a half-written ``folder`` never exists). The temporary folder
    holds a marker file (:data:`INCOMPLETE`) until the end, so that :func:`load` refuses it if the
    process is killed; the next save to the same ``folder`` removes such leftovers."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose another --out or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    try:
        mask = _umask()
        tmp.chmod(0o777 & ~mask)
        (tmp / INCOMPLETE).write_text("written by gqsa.checkpoint.atomic_folder; removed when complete\n")
        yield tmp
        (tmp / INCOMPLETE).unlink()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~mask)
                _fsync(f)
            elif f.is_dir() and not f.is_symlink():
                f.chmod(0o777 & ~mask)
        _fsync(tmp)
        if folder.exists():
            trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(trash)
            tmp.rename(folder)
            shutil.rmtree(trash)
        else:
            tmp.rename(folder)
        _fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checksummed_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not UNCHECKED.match(f.name) and f.name != INCOMPLETE)


def write_report(folder: Path, report: dict | None) -> None:
    """``gqsa_report.json`` in ``folder``, with the sha256 of every other file there."""
    report = dict(report or {})
    report["files"] = {f.name: sha256(f) for f in _checksummed_files(folder)}
    (folder / REPORT).write_text(json.dumps(_finite_json(report), indent=2, allow_nan=False))


def refresh_checksums(folder) -> None:
    """Record the current sha256 of every file of ``folder`` in its ``gqsa_report.json`` (after editing
    a file on purpose; the rest of the report is kept)."""
    folder = Path(folder)
    report = read_json(folder / REPORT, folder) if (folder / REPORT).is_file() else {}
    write_report(folder, report)


def _finite_json(value):
    """``value`` with non-finite floats replaced by None (JSON has no NaN; :func:`read_json` refuses it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def write_json_atomic(path, data) -> None:
    """Replace the JSON file ``path`` atomically (temporary file, fsync, rename), keeping its mode;
    non-finite numbers are written as null."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite_json(data), indent=2, allow_nan=False))
    tmp.chmod(path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
    _fsync(tmp)
    os.replace(tmp, path)


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise FormatError(f"{folder} is a file, not a GQSA checkpoint folder")
    if (folder / INCOMPLETE).exists():
        raise FormatError(f"{folder} is the temporary folder of an interrupted save (it holds {INCOMPLETE}); "
                          f"delete it and compress again")
    return folder


def _inside(folder: Path, path: Path, what: str = "file") -> Path:
    """``path`` (an entry of ``folder``) if it stays inside the folder; FormatError otherwise."""
    if path.is_symlink():
        try:
            target = path.resolve()
        except (RuntimeError, OSError) as e:  # a loop
            raise FormatError(f"{path} is a symbolic link that cannot be followed ({e})") from None
        if not target.is_relative_to(folder.resolve()):
            raise FormatError(f"{path} is a symbolic link to {target}, outside the checkpoint folder; "
                              f"copy the {what} into the folder")
    return path


def _regular_file(folder: Path, name: str, what: str = "file") -> Path:
    path = _inside(folder, folder / name, what)
    if not path.is_file():
        kind = "missing" if not path.exists() and not path.is_symlink() else "not a regular file"
        raise FormatError(f"{path} is {kind}; the checkpoint folder is incomplete or damaged")
    return path


def _reject_constant(name):
    raise ValueError(f"{name} is not a valid JSON number")


def read_json(path, folder=None) -> dict:
    """A JSON object from an untrusted file: size-limited, no NaN/Infinity (nor numbers that overflow to
    them), nesting at most :data:`MAX_JSON_DEPTH`; FormatError naming the file otherwise."""
    path = Path(path)
    if folder is not None:
        path = _regular_file(Path(folder), path.name)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise FormatError(f"{path} is {size:,} bytes, more than the {MAX_JSON_BYTES:,} a JSON file of a "
                              f"checkpoint may have")
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise FormatError(f"{path} is not UTF-8 text ({e}); the file is corrupt") from None
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply; the file is corrupt") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{path} is not valid JSON ({e}); the file is corrupt") from None
    except OSError as e:
        raise FormatError(f"{path} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    stack = [(data, 1, "")]
    while stack:  # iterative: deep nesting cannot exhaust the Python stack
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep (at {where or 'top'})")
        if isinstance(value, float) and not math.isfinite(value):
            raise FormatError(f"{path}: {where} is {value}; numbers must be finite")
        if isinstance(value, dict):
            stack.extend((v, depth + 1, f"{where}.{k}" if where else str(k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))
    return data


def refuse_remote_code(folder: Path, name: str, data: dict) -> None:
    """Refuse a JSON file (config.json, tokenizer_config.json) that asks transformers to run the folder's code."""
    if "auto_map" in data:
        raise FormatError(f"{folder / name} has auto_map: the folder asks to run its own Python code, which gqsa "
                          f"never does (trust_remote_code=False); use a folder of a built-in architecture")


def check_quantization_config(qc: dict, where: str = "quantization_config") -> None:
    """Check a ``quantization_config`` dict (of a folder, or of a hub checkpoint, which has no local
    folder to read): GQSA's quant_method, a supported format version, a well-formed layer map."""
    if not isinstance(qc, dict):
        raise FormatError(f"{where}: quantization_config is a {type(qc).__name__}, expected an object")
    if qc.get("quant_method") != "gqsa":
        raise FormatError(f"{where}: quant_method '{qc.get('quant_method')}' is not 'gqsa'; "
                          f"load it with the library that wrote it")
    if not _is_int(qc.get("format_version")) or qc.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{where}: GQSA format version {qc.get('format_version')!r} is not supported "
                          f"(this gqsa reads version {FORMAT_VERSION}); upgrade gqsa")
    if qc.get("zero_point", "int") not in ("int", "float"):
        raise FormatError(f"{where}: quantization_config zero_point is {qc.get('zero_point')!r}, "
                          f"expected 'int' or 'float'")
    for key in ("bits", "group_size"):
        if key in qc and not _is_int(qc[key]):
            raise FormatError(f"{where}: quantization_config {key} is {qc[key]!r}, expected an integer")
    if "sparsity" in qc and not (isinstance(qc["sparsity"], (int, float)) and not isinstance(qc["sparsity"], bool)
                                 and 0 <= qc["sparsity"] < 1):
        raise FormatError(f"{where}: quantization_config sparsity is {qc['sparsity']!r}, expected a number in [0, 1)")
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise FormatError(f"{where}: quantization_config lists no compressed layers")
    for name, meta in layers.items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("shape"), list) and len(meta["shape"]) == 2
              and all(_is_int(v) and 0 < v <= 1 << 20 for v in meta["shape"])
              and _is_int(meta.get("bits")) and _is_int(meta.get("group_size")))
        if not ok or not name or name.startswith(".") or name.endswith("."):
            raise FormatError(f"{where}: quantization_config entry of {name} needs shape [N, K] (positive "
                              f"integers), integer bits and group_size; found {meta!r:.200}")


def read_quantization_config(folder) -> tuple[dict, dict]:
    """(config.json as a dict, its validated ``quantization_config``) of a checkpoint folder."""
    folder = _check_folder(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() and not cfg_path.is_symlink():
        raise FormatError(f"{folder} is not a model folder: it has no config.json")
    config = read_json(cfg_path, folder)
    refuse_remote_code(folder, "config.json", config)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise FormatError(f"{folder} is not a GQSA checkpoint: config.json has no quantization_config "
                          f"(an uncompressed model? compress it with `gqsa compress`)")
    check_quantization_config(qc, str(cfg_path))
    return config, qc


def _shard_names(folder: Path) -> tuple[list[str], dict | None]:
    """(shard file names, weight_map of the index or None)."""
    index_name = "model.safetensors.index.json"
    if (folder / index_name).is_file() or (folder / index_name).is_symlink():
        index = read_json(folder / index_name, folder)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise FormatError(f"{folder / index_name}: weight_map is missing or not an object of tensor -> file")
        for k, v in wm.items():
            if not isinstance(v, str) or not _SHARD.match(v):
                raise FormatError(f"{folder / index_name}: tensor {k} maps to {v!r}, which is not the name of a "
                                  f".safetensors file in the folder (no paths allowed)")
        return sorted(set(wm.values())), wm
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors").is_symlink():
        return ["model.safetensors"], None
    raise FormatError(f"{folder} has no model.safetensors")


def verify_checksums(folder, shards: list[str]) -> None:
    """Check the files of ``folder`` against ``gqsa_report.json``: the report must be there and list
    every shard (and, when it lists config.json, every file a loader reads)."""
    folder = Path(folder)
    path = folder / REPORT
    if not path.is_file() or path.is_symlink():
        raise FormatError(f"{path} is missing or not a regular file: the checksums of the folder cannot be "
                          f"verified; restore it, or pass --no-verify (verify=False) to load without them")
    report = read_json(path, folder)
    files = report.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA.match(v)
                                              for k, v in files.items()):
        raise FormatError(f"{path}: 'files' must map file names to sha256 hex digests; the report is damaged "
                          f"(pass --no-verify to load without checksums)")
    unlisted = sorted((set(shards) | {f.name for f in _checksummed_files(folder)}) - set(files))
    if unlisted:  # (reports written before every file was checksummed land here too: refresh_checksums)
        raise FormatError(f"{path} has no checksum for {', '.join(unlisted[:3])}: the file was added or the "
                          f"report damaged; pass --no-verify to load without checksums, or, if you trust the "
                          f"folder, record them with gqsa.checkpoint.refresh_checksums")
    for name, digest in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise FormatError(f"{path}: 'files' names {name!r}, not a file of the folder")
        f = _regular_file(folder, name)
        if sha256(f) != digest:
            raise FormatError(f"{f}: checksum does not match {REPORT}; the file was modified or is corrupt")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in the floating tensor ``t`` (float8 included, checked through float32)."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # float8: no isfinite
        t = t.to(torch.float32)
    return bool(torch.isfinite(t).all())


def read_tensors(folder, verify: bool = True, origin: dict | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder; a truncated, tampered or missing file raises FormatError.
    ``origin`` (a dict) receives tensor name -> the file it came from."""
    folder = _check_folder(folder)
    for entry in folder.iterdir():
        _inside(folder, entry)
    shards, weight_map = _shard_names(folder)
    if verify:
        verify_checksums(folder, shards)
    tensors: dict[str, torch.Tensor] = {}
    where = {} if origin is None else origin
    for f in shards:
        path = _regular_file(folder, f, "shard")
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


def validated_layers(folder, qc: dict, tensors: dict[str, torch.Tensor], origin=None) -> dict[str, PackedLinear]:
    """The packed layers of the layer map ``qc["layers"]`` built from ``tensors``, each validated
    (:func:`gqsa.format.validate`); ``origin`` names the file each tensor came from, for the messages."""
    out = {}
    origin = origin or {}
    for name, meta in qc["layers"].items():
        missing = [t for t in TENSOR_NAMES if f"{name}.{t}" not in tensors]
        if missing:
            raise FormatError(f"{Path(folder) / 'config.json'}: quantization_config lists layer {name}, but the "
                              f".safetensors files lack its tensor(s) {', '.join(missing)}")
        shape, bits, group_size = tuple(meta["shape"]), meta["bits"], meta["group_size"]
        p = PackedLinear(**{t: tensors[f"{name}.{t}"] for t in TENSOR_NAMES}, shape=shape, bits=bits,
                         group_size=group_size)
        p.validate(f"{origin.get(f'{name}.row_ptr', folder)}: {name}")
        out[name] = p
    packed_modules = {n.rpartition(".")[0] for n in tensors if n.rpartition(".")[2] in TENSOR_NAMES}
    extra = sorted(packed_modules - set(qc["layers"]))
    if extra:
        first = origin.get(f"{extra[0]}.row_ptr") or origin.get(f"{extra[0]}.qweight") or folder
        raise FormatError(f"{first}: tensors of a packed layer {extra[0]} that quantization_config does not list; "
                          f"the layer map of config.json is damaged")
    return out


_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def check_model_config(config: dict, path, tensors: dict | None = None) -> None:
    """Types and ranges of an untrusted ``config.json`` (as a dict), before transformers sees it: values
    of the types the model type's config class uses, positive dimensions under :data:`LIMITS`, token
    ids inside the vocabulary, and (given the tensors) a layer count equal to the checkpoint's."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise FormatError(f"{path}: model_type {model_type!r} is not an architecture transformers knows")
    try:
        defaults = CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # a config class that needs arguments: check what can be checked without it
        defaults = {}
    for key, value in config.items():
        want = defaults.get(key)
        if value is None or want is None or key in _TOKEN_KEYS:
            continue
        if isinstance(want, bool):
            ok = isinstance(value, bool)
        elif isinstance(want, int):
            ok = _is_int(value)
        elif isinstance(want, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(want, (str, dict, list)):
            ok = isinstance(value, type(want))
        else:
            ok = True
        if not ok:
            raise FormatError(f"{path}: {key} is {value!r:.80} ({type(value).__name__}), expected "
                              f"{type(want).__name__}")
    for key, limit in LIMITS.items():
        if key in config and config[key] is not None:
            v = config[key]
            if not _is_int(v) or not 0 < v <= limit:
                raise FormatError(f"{path}: {key} is {v!r:.80}, expected an integer in [1, {limit}]")
    vocab = config.get("vocab_size")
    for key in _TOKEN_KEYS:
        v = config.get(key)
        ids = v if isinstance(v, list) else [v]
        if not all(i is None or (_is_int(i) and 0 <= i < (vocab if _is_int(vocab) else 1 << 31)) for i in ids):
            raise FormatError(f"{path}: {key} is {v!r:.80}, not a token id of the {vocab}-token vocabulary")
    if tensors is not None:
        idx = {int(m.group(1)) for n in tensors for m in [re.search(r"(?:^|\.)layers\.(\d+)\.", n)] if m}
        n_layers = config.get("num_hidden_layers")
        if idx and n_layers != len(idx) or idx and max(idx) + 1 != len(idx):
            raise FormatError(f"{path}: num_hidden_layers is {n_layers!r} but the tensors hold layers "
                              f"{min(idx)}..{max(idx)} ({len(idx)} of them)")


def check_companion_files(folder: Path, config: dict) -> None:
    """generation_config.json (JSON, token ids in the vocabulary) and tokenizer_config.json (JSON, no
    auto_map) of a checkpoint folder, when present."""
    gen_path = folder / "generation_config.json"
    if gen_path.exists() or gen_path.is_symlink():
        check_model_config({"model_type": config["model_type"], "vocab_size": config.get("vocab_size"),
                            **{k: v for k, v in read_json(gen_path, folder).items() if k in _TOKEN_KEYS}}, gen_path)
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists() or tok_cfg.is_symlink():
        refuse_remote_code(folder, "tokenizer_config.json", read_json(tok_cfg, folder))


def _third_party(what: str, fn, *args, **kwargs):
    """Call transformers on untrusted files: whatever it raises becomes one FormatError line."""
    try:
        return fn(*args, **kwargs)
    except FormatError:
        raise
    except (Exception, RecursionError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FormatError(f"{what} ({type(e).__name__}: {text[:300]})") from None


def load(folder, device="cpu", dtype: torch.dtype | None = None, verify: bool = True):
    """Load a GQSA checkpoint folder into a transformers model with :class:`GQSALinear` layers.

    Returns ``(model, tokenizer)`` (tokenizer ``None`` if the folder has none). Everything is checked
    (see the module's docstring) before the model is built on the meta device, so nothing dense is
    allocated for the compressed linears and nothing at all for a folder that is refused. ``dtype``:
    the dense tensors' dtype (default: as stored); the packed tensors keep theirs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = Path(folder)
    config_dict, qc = read_quantization_config(folder)
    origin: dict = {}
    tensors = read_tensors(folder, verify, origin)
    validated_layers(folder, qc, tensors, origin)
    cfg_path = folder / "config.json"
    check_model_config(config_dict, cfg_path, tensors)
    check_companion_files(folder, config_dict)
    gen_path = folder / "generation_config.json"

    config = _third_party(f"{cfg_path}: transformers cannot read this config", AutoConfig.from_pretrained, folder,
                          trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    stored = _dense_dtype(tensors, qc)
    target = dtype or stored
    with torch.device("meta"):
        model = _third_party(f"{cfg_path}: transformers cannot build a {config_dict['model_type']} model from it",
                             AutoModelForCausalLM.from_config, config, dtype=target, trust_remote_code=False)
    for name, meta in qc["layers"].items():
        parent_name, _, child = name.rpartition(".")
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
        setattr(model.get_submodule(parent_name), child,
                GQSALinear(k, n, meta["bits"], meta["group_size"], bias=old.bias is not None,
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
            if t.dtype not in _DENSE_DTYPES:
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
        model.generation_config = _third_party(f"{gen_path} is not a valid generation config",
                                               GenerationConfig.from_pretrained, folder)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tok_files = ", ".join(f.name for f in sorted(folder.glob("tok*")) + sorted(folder.glob("special_tokens*")))
        tokenizer = _third_party(f"{folder}: its tokenizer files ({tok_files}) cannot be loaded",
                                 AutoTokenizer.from_pretrained, folder, trust_remote_code=False)
        # settings of tokenizer_config.json are used only when text is encoded: try it once here
        _third_party(f"{folder}: its tokenizer ({tok_files}) cannot encode text; the files are damaged",
                     lambda: tokenizer.decode(tokenizer("Hello, world.").input_ids))
        if len(tokenizer) > model.config.get_text_config().vocab_size:
            raise FormatError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                              f"{model.config.get_text_config().vocab_size}; the tokenizer files do not belong here")
    return model, tokenizer


def _dense_dtype(tensors, qc) -> torch.dtype:
    packed = {f"{n}.{t}" for n in qc["layers"] for t in TENSOR_NAMES}
    for name, t in tensors.items():
        if name not in packed and t.dtype in _DENSE_DTYPES:
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
