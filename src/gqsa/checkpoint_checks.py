"""Reading an untrusted checkpoint folder: bounded JSON, config and quantization_config checks, shard names
inside the folder, checksums, packed-layer validation; every problem one :class:`~gqsa.format.FormatError` line."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .folder_io import INCOMPLETE, REPORT, checksummed_files, sha256
from .format import TENSOR_NAMES, FormatError, PackedLinear

FORMAT_VERSION = 1
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
# upper bounds of config.json dimensions, checked before any model is built (the largest public
# LLaMA-family models use 126 layers, a 256k vocabulary, 53248 intermediate features)
LIMITS = {"num_hidden_layers": 1024, "vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
          "max_position_embeddings": 1 << 28}
_SHARD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise FormatError(f"{folder} is a file, not a GQSA checkpoint folder")
    if (folder / INCOMPLETE).exists():
        raise FormatError(f"{folder} is the temporary folder of an interrupted save (it holds {INCOMPLETE}); "
                          f"delete it and compress again")
    return folder


def inside_folder(folder: Path, path: Path, what: str = "file") -> Path:
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


def regular_file(folder: Path, name: str, what: str = "file") -> Path:
    path = inside_folder(folder, folder / name, what)
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
        path = regular_file(Path(folder), path.name)
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
    folder = check_folder(folder)
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


def shard_names(folder: Path) -> tuple[list[str], dict | None]:
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
    unlisted = sorted((set(shards) | {f.name for f in checksummed_files(folder)}) - set(files))
    if unlisted:  # (reports written before every file was checksummed land here too: refresh_checksums)
        raise FormatError(f"{path} has no checksum for {', '.join(unlisted[:3])}: the file was added or the "
                          f"report damaged; pass --no-verify to load without checksums, or, if you trust the "
                          f"folder, record them with gqsa.checkpoint.refresh_checksums")
    for name, digest in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise FormatError(f"{path}: 'files' names {name!r}, not a file of the folder")
        f = regular_file(folder, name)
        if sha256(f) != digest:
            raise FormatError(f"{f}: checksum does not match {REPORT}; the file was modified or is corrupt")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in the floating tensor ``t`` (float8 included, checked through float32)."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # float8: no isfinite
        t = t.to(torch.float32)
    return bool(torch.isfinite(t).all())


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
        p = PackedLinear.from_tensors(tensors, name, shape, bits, group_size)
        p.validate(f"{origin.get(f'{name}.row_ptr', folder)}: {name}")
        out[name] = p
    packed_modules = {n.rpartition(".")[0] for n in tensors if n.rpartition(".")[2] in TENSOR_NAMES}
    extra = sorted(packed_modules - set(qc["layers"]))
    if extra:
        first = origin.get(f"{extra[0]}.row_ptr") or origin.get(f"{extra[0]}.qweight") or folder
        raise FormatError(f"{first}: tensors of a packed layer {extra[0]} that quantization_config does not list; "
                          f"the layer map of config.json is damaged")
    return out


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


def third_party(what: str, fn, *args, **kwargs):
    """Call transformers on untrusted files: whatever it raises becomes one FormatError line."""
    try:
        return fn(*args, **kwargs)
    except FormatError:
        raise
    except (Exception, RecursionError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FormatError(f"{what} ({type(e).__name__}: {text[:300]})") from None
