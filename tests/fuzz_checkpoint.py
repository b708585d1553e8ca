"""A seeded fuzzer of GQSA checkpoint folders (used by tests/test_fuzz.py; also a script for long runs).

Each case copies an intact folder, damages it with one mutation of one class, loads it with
:func:`gqsa.load` and classifies the outcome:

* ``refused``  — :class:`gqsa.FormatError`, one line, naming the folder's path (the file and the problem);
* ``equal``    — loaded, and the logits of a fixed prompt and the tokenization of a fixed text are
  bitwise those of the intact folder (allowed only for mutations that may be harmless);
* ``ugly``     — any other exception, or a FormatError that is multi-line or does not name the path;
* ``accepted`` — a corruption loaded silently: outputs differ, or a mutation that must be refused loaded;
* ``crash``    — an exception after loading (forward, tokenizer), RecursionError / MemoryError, or a case
  slower than :data:`SLOW_S` seconds (limits must be checked before anything is allocated).

Mutation classes: byte flips, truncation and appended bytes with the checksums kept (must be refused);
tensor and safetensors-header corruptions, JSON values of wrong types, non-finite numbers, deep nesting,
huge dimensions, shard paths leaving the folder — all re-saved with *fixed* checksums, so the loader's own
validation is what refuses them; removed or damaged checksums; symbolic links leaving the folder;
deleted, added or replaced files; the temporary folder of an interrupted save.

A mutation never makes a *valid* edit (a different but well-formed weight value, token string or
``rms_norm_eps``): no validator can tell those from the original, which is what the checksums are for.

Long runs::

    PYTHONPATH=src python tests/fuzz_checkpoint.py --cases 10000 [--seed 0] [--base FOLDER]
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SLOW_S = 60.0
PROMPT = [1, 5, 9, 100, 200, 300, 17]
TEXT = "Once upon a time, there was a little girl."

BAD_VALUES = [None, "x", "", [], {}, [1, 2], {"a": 1}, True, False, -1, 0, 4.0, 1.5, 100000, 10**9, 2**63,
              -(2**63), 10**30]
NONFINITE_TEXT = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]


# ---------------------------------------------------------------------------------------------- helpers

def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _refresh(folder: Path) -> None:
    """Re-record the checksums of the damaged files (the 'fixed checksum' variants)."""
    from gqsa import checkpoint

    rep = folder / checkpoint.REPORT
    report = json.loads(rep.read_text()) if rep.is_file() else {}
    checkpoint.write_report(folder, report)


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _row_ptr(folder: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for shard in _shards(folder):
        with safe_open(str(shard), framework="pt") as h:
            if name in h.keys():
                return h.get_tensor(name)
    raise KeyError(name)


def _split_safetensors(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header: dict, data: bytes, raw_header: bytes | None = None) -> bytes:
    hb = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def _json_paths(obj, prefix=()):
    """Every (path, value) of a JSON document, depth-first."""
    out = [(prefix, obj)]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:20]):
            out += _json_paths(v, prefix + (i,))
    return out


def _set_path(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _del_path(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


class Placeholder:
    """A JSON value written as raw text (NaN, Infinity, 1e400, deep nesting)."""

    def __init__(self, text):
        self.text = text


def _dump_with_placeholders(obj) -> str:
    marks = {}

    def swap(o):
        if isinstance(o, Placeholder):
            key = f"@@PLACEHOLDER{len(marks)}@@"
            marks[key] = o.text
            return key
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        return o

    text = json.dumps(swap(obj), indent=1)
    for key, raw in marks.items():
        text = text.replace(f'"{key}"', raw)
    return text


def _different_type(old, new) -> bool:
    """``new`` is of another JSON type than ``old`` (an int where a float is expected counts as the same
    type only when it is a float's value: those are valid edits, never generated)."""
    def kind(v):
        if isinstance(v, bool):
            return "bool"
        if isinstance(v, (int, float)):
            return "number"
        return type(v).__name__
    return kind(old) != kind(new)


# ---------------------------------------------------------------------------------------------- mutations
# each returns (description, expectation): "refuse" = must be refused; "either" = refused or equal outputs

def m_flip_bytes(folder, rng, ctx):
    f = rng.choice(_files(folder))
    raw = bytearray(f.read_bytes())
    if not raw:
        return f"{f.name}: empty, nothing flipped", "either"
    region = rng.choice(["head", "any"])
    hi = min(len(raw), 256) if region == "head" else len(raw)
    where = []
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(hi)
        raw[i] ^= rng.randint(1, 255)
        where.append(i)
    f.write_bytes(bytes(raw))
    return f"{f.name}: flipped bytes at {where[:4]}", ("either" if f.name == "gqsa_report.json" else "refuse")


def m_truncate(folder, rng, ctx):
    f = rng.choice(_files(folder))
    raw = f.read_bytes()
    n = rng.choice([0, 1, 7, 8, rng.randrange(max(1, len(raw))), len(raw) - 1]) if raw else 0
    n = max(0, min(n, len(raw) - 1))
    f.write_bytes(raw[:n])
    return f"{f.name}: truncated to {n} of {len(raw)} bytes", "refuse"


def m_append(folder, rng, ctx):
    f = rng.choice(_files(folder))
    with open(f, "ab") as h:
        h.write(bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100]))))
    return f"{f.name}: bytes appended", ("either" if f.name == "gqsa_report.json" else "refuse")


INT_EDITS = ("row_ptr_end", "row_ptr_start", "row_ptr_decrease", "col_idx_range", "col_idx_negative",
             "col_idx_repeat", "zeros_range")


def m_tensor(folder, rng, ctx):
    """A semantic corruption of one tensor, re-saved with fixed checksums."""
    shard = rng.choice(_shards(folder))
    t = load_file(shard)
    name = rng.choice(sorted(t))
    x = t[name]
    leaf = name.rpartition(".")[2]
    ops = ["dtype", "shape_drop", "shape_add", "flatten", "unsqueeze", "remove", "extra", "rename", "nonfinite"]
    if leaf in ("row_ptr", "col_idx", "zeros") and not x.is_floating_point():
        ops += ["int"] * 4
    op = rng.choice(ops)
    desc = f"{shard.name}: {name} {op}"
    if op == "dtype":
        dt = rng.choice([torch.float64, torch.float8_e4m3fn, torch.int8, torch.int32, torch.int64, torch.uint8,
                         torch.bfloat16, torch.float16, torch.float32, torch.int16, torch.bool])
        if dt == x.dtype:
            dt = torch.float64
        y = x.to(torch.float32).to(dt) if x.is_floating_point() or dt.is_floating_point else x.to(dt)
        if y.is_floating_point():
            y = torch.where(torch.isfinite(y.float()), y, torch.zeros_like(y))
        t[name] = y.contiguous()
        desc += f" -> {dt}"
    elif op == "shape_drop":
        if x.shape[0] == 0:
            return desc + " (empty, unchanged)", "either"
        t[name] = x[:-1].contiguous()
    elif op == "shape_add":
        t[name] = torch.cat([x, x[:1]]) if x.shape[0] else torch.zeros((1, *x.shape[1:]), dtype=x.dtype)
    elif op == "flatten":
        if x.dim() < 2:
            t[name] = x.reshape(1, -1).contiguous()
        else:
            t[name] = x.reshape(-1).contiguous()
    elif op == "unsqueeze":
        t[name] = x.unsqueeze(0).contiguous()
    elif op == "remove":
        del t[name]
    elif op == "extra":
        kind = rng.choice(["junk", "packed", "dense"])
        new = {"junk": "junk.tensor", "packed": "model.layers.0.mlp.nonexistent.qweight",
               "dense": "model.layers.99.input_layernorm.weight"}[kind]
        t[new] = torch.zeros(4)
        desc += f" {new}"
    elif op == "rename":
        t[name + "_renamed"] = t.pop(name)
    elif op == "nonfinite":
        if not x.is_floating_point() or x.numel() == 0:
            return desc + " (not float, unchanged)", "either"
        y = x.clone().reshape(-1)
        y[rng.randrange(y.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        t[name] = y.reshape(x.shape)
    elif op == "int":
        y = x.clone()
        n = y.numel()
        which = rng.choice([e for e in INT_EDITS if e.split("_")[0] == leaf.split("_")[0]] or ["row_ptr_end"])
        desc += f" {which}"
        if n == 0:
            return desc + " (empty)", "either"
        if which == "row_ptr_end":
            y[-1] += rng.choice([1, -1, 1000])
        elif which == "row_ptr_start":
            y[0] = rng.choice([1, -1, 5])
        elif which == "row_ptr_decrease":
            if n < 3 or int(y[1]) == 0:
                y[-1] += 1
            else:
                y[1] = int(y[-1]) + 1 if int(y[-1]) + 1 < 2**31 else -1
        elif which == "col_idx_range":
            y[rng.randrange(n)] = rng.choice([32767, 10000, 600])
        elif which == "col_idx_negative":
            y[rng.randrange(n)] = -rng.randint(1, 32768)
        elif which == "col_idx_repeat":  # entry i equal to entry i-1 of the same row: not strictly ascending
            starts = set(_row_ptr(folder, name[: -len("col_idx")] + "row_ptr").tolist())
            inner = [i for i in range(1, n) if i not in starts]
            if inner:
                i = rng.choice(inner)
                y[i] = y[i - 1]
            else:
                y[0] = -1
        elif which == "zeros_range":
            y[rng.randrange(n)] = rng.choice([16, 200, 255])
        t[name] = y
    save_file(t, shard, metadata={"format": "pt"})
    _refresh(folder)
    return desc, "refuse"


def m_header(folder, rng, ctx):
    """A corruption of a safetensors header, re-saved with fixed checksums."""
    shard = rng.choice(_shards(folder))
    header, data = _split_safetensors(shard)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    e = header[name]
    op = rng.choice(["dtype_bad", "dtype_same_size", "shape_bad", "shape_huge", "shape_swap", "offsets_out",
                     "offsets_overlap", "offsets_type", "missing_field", "metadata", "hlen_big", "hlen_zero",
                     "not_json", "not_object", "drop_entry"])
    desc = f"{shard.name}: {name} {op}"
    raw_header = None
    expect = "refuse"
    if op == "dtype_bad":
        e["dtype"] = rng.choice(["F33", "", "float", 5, None])
    elif op == "dtype_same_size":
        same = {"F32": ["I32", "U32"], "F16": ["BF16", "I16", "U16"], "BF16": ["F16", "I16"], "I32": ["F32", "U32"],
                "I16": ["F16", "BF16", "U16"], "U8": ["I8", "BOOL", "F8_E4M3", "F8_E5M2"], "I64": ["F64", "U64"]}
        e["dtype"] = rng.choice(same.get(e["dtype"], ["F64"]))
        desc += f" -> {e['dtype']}"
    elif op == "shape_bad":
        e["shape"] = rng.choice([[-1], ["a"], None, 3, [1.5], [0], []])
    elif op == "shape_huge":
        e["shape"] = rng.choice([[2**62, 2**62], [2**40], [10**9, 10**9], [2**64]])
    elif op == "shape_swap":
        if len(e["shape"]) < 2 or e["shape"][0] == e["shape"][1]:
            e["shape"] = list(e["shape"]) + [1]
            expect = "refuse"
        else:
            e["shape"] = [e["shape"][1], e["shape"][0]] + e["shape"][2:]
    elif op == "offsets_out":
        e["data_offsets"] = [e["data_offsets"][0], e["data_offsets"][1] + rng.choice([1, 8, 10**6])]
    elif op == "offsets_overlap":
        b, end = e["data_offsets"]
        e["data_offsets"] = [b - rng.choice([1, 4]), end] if b >= 4 else [b, end - 1]
    elif op == "offsets_type":
        e["data_offsets"] = rng.choice([["a", 1], [1], None, [-1, 4], [2**64, 2**64 + 4]])
    elif op == "missing_field":
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == "metadata":
        header["__metadata__"] = rng.choice([{"format": 5}, {"a": {"b": 1}}, "x", [1]])
    elif op == "hlen_big":
        raw = shard.read_bytes()
        shard.write_bytes(struct.pack("<Q", rng.choice([2**63, len(raw), 10**8])) + raw[8:])
        _refresh(folder)
        return desc, "refuse"
    elif op == "hlen_zero":
        raw = shard.read_bytes()
        shard.write_bytes(struct.pack("<Q", 0) + raw[8:])
        _refresh(folder)
        return desc, "refuse"
    elif op == "not_json":
        raw_header = b"{" + json.dumps(header).encode()[1:-1] + b",,}"
    elif op == "not_object":
        raw_header = json.dumps(rng.choice([[1], "x", 5, None])).encode()
    elif op == "drop_entry":
        del header[name]  # its bytes are left unreferenced
    shard.write_bytes(_join_safetensors(header, data, raw_header))
    _refresh(folder)
    return desc, expect


JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json",
              "gqsa_report.json", "tokenizer.json")


def _json_target(folder, rng):
    present = [f for f in JSON_FILES if (folder / f).is_file()]
    return folder / rng.choice(present)


def m_json_type(folder, rng, ctx):
    """A JSON value of another type (or a key deleted, or the document replaced), fixed checksums."""
    f = _json_target(folder, rng)
    doc = json.loads(f.read_text())
    paths = [p for p, _ in _json_paths(doc) if p]
    op = rng.choice(["set", "set", "set", "delete", "document"])
    if f.name == "tokenizer.json":  # its vocabulary and pipeline are content (null / deleted parts are valid
        paths = [p for p in paths if len(p) == 1]  # edits): only its top-level structure gets wrong types
        op = "set" if op == "delete" else op
    expect = "either"
    if op == "document":
        text = json.dumps(rng.choice([[], "x", 5, None, [doc]]))
        desc = f"{f.name}: replaced by {text[:20]}"
    else:
        path = rng.choice(paths)
        old = _json_paths(doc)
        old = dict((p, v) for p, v in old)[path]
        if op == "delete":
            _del_path(doc, path)
            desc = f"{f.name}: deleted {'.'.join(map(str, path))}"
        else:
            choices = [v for v in BAD_VALUES if _different_type(old, v)
                       and not (f.name == "tokenizer.json" and v is None)]
            value = rng.choice(choices)
            _set_path(doc, path, value)
            desc = f"{f.name}: {'.'.join(map(str, path))} = {json.dumps(value)[:30]} (was {json.dumps(old)[:30]})"
        text = json.dumps(doc, indent=1)
    f.write_text(text)
    if f.name != "gqsa_report.json":  # (the report's own damage is the mutation)
        _refresh(folder)
    return desc, expect


def m_json_nonfinite(folder, rng, ctx):
    """NaN / Infinity / 1e400 for a number, or nesting 100000 deep, fixed checksums: must be refused."""
    f = _json_target(folder, rng)
    if f.name == "tokenizer.json":
        f = folder / "config.json"
    doc = json.loads(f.read_text())
    numbers = [p for p, v in _json_paths(doc) if p and isinstance(v, (int, float)) and not isinstance(v, bool)]
    kind = rng.choice(["number", "number", "deep"])
    if kind == "deep" or not numbers:
        depth = rng.choice([100, 10000, 100000])
        path = rng.choice([p for p, _ in _json_paths(doc) if p])
        _set_path(doc, path, Placeholder("[" * depth + "]" * depth))
        desc = f"{f.name}: {'.'.join(map(str, path))} nested {depth} deep"
    else:
        path = rng.choice(numbers)
        text = rng.choice(NONFINITE_TEXT)
        _set_path(doc, path, Placeholder(text))
        desc = f"{f.name}: {'.'.join(map(str, path))} = {text}"
    f.write_text(_dump_with_placeholders(doc))
    if f.name != "gqsa_report.json":
        _refresh(folder)
    return desc, "refuse"


DIMS = ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings")


def m_huge_dims(folder, rng, ctx):
    """A dimension of config.json made huge, zero, negative or off by one; fixed checksums."""
    f = folder / "config.json"
    doc = json.loads(f.read_text())
    key = rng.choice(DIMS)
    old = doc.get(key)
    value = rng.choice([100000, 10**9, 2**31, 2**62, 0, -1, (old or 1) + 1, (old or 2) * 2, (old or 2) - 1])
    doc[key] = value
    f.write_text(json.dumps(doc, indent=1))
    _refresh(folder)
    # a larger max_position_embeddings allocates nothing and changes no output: either outcome is right
    return f"config.json: {key} = {value} (was {old})", ("either" if key == "max_position_embeddings" and value > 0
                                                          else "refuse")


def m_layer_map(folder, rng, ctx):
    """quantization_config.layers: an entry removed, added, renamed, or its settings changed; fixed checksums."""
    f = folder / "config.json"
    doc = json.loads(f.read_text())
    layers = doc["quantization_config"]["layers"]
    name = rng.choice(sorted(layers))
    op = rng.choice(["remove", "add", "rename", "bits", "group_size", "shape", "all_removed"])
    if op == "remove":
        del layers[name]
    elif op == "add":
        layers["model.layers.0.mlp.extra_proj"] = dict(layers[name])
    elif op == "rename":
        layers[name + "x"] = layers.pop(name)
    elif op == "bits":
        layers[name]["bits"] = rng.choice([2, 3, 8, 5, 0, 4.0])
        if layers[name]["bits"] == 4:
            layers[name]["bits"] = 3
    elif op == "group_size":
        layers[name]["group_size"] = rng.choice([32, 64, 8, 0, 16.0])
    elif op == "shape":
        n, k = layers[name]["shape"]
        layers[name]["shape"] = rng.choice([[k, n] if k != n else [n + 1, k], [n + 1, k], [n, k + 1], [n, k - 1]])
    elif op == "all_removed":
        doc["quantization_config"]["layers"] = {}
    f.write_text(json.dumps(doc, indent=1))
    _refresh(folder)
    return f"config.json: layer map {op} {name}", "refuse"


def m_checksum_removed(folder, rng, ctx):
    """Checksums removed or damaged (and a tensor file changed behind them): must be refused under verify."""
    rep = folder / "gqsa_report.json"
    shard = rng.choice(_shards(folder))
    raw = bytearray(shard.read_bytes())
    raw[-1 - rng.randrange(min(len(raw) // 2, 1000))] ^= 0x55  # a data byte
    shard.write_bytes(bytes(raw))
    op = rng.choice(["delete", "folder", "drop_entry", "files_type", "empty", "not_object", "symlink", "bad_digest",
                     "drop_config_entry"])
    report = json.loads(rep.read_text())
    if op == "delete":
        rep.unlink()
    elif op == "folder":
        rep.unlink()
        rep.mkdir()
    elif op == "drop_entry":
        report["files"].pop(shard.name)
        rep.write_text(json.dumps(report))
    elif op == "drop_config_entry":
        report["files"].pop("config.json", None)
        report["files"].pop(shard.name)
        rep.write_text(json.dumps(report))
    elif op == "files_type":
        report["files"] = rng.choice([[], "x", None, 5, {}, {shard.name: 5}])
        rep.write_text(json.dumps(report))
    elif op == "empty":
        rep.write_text("")
    elif op == "not_object":
        rep.write_text(json.dumps(rng.choice([[], "x", None])))
    elif op == "symlink":
        rep.unlink()
        rep.symlink_to(ctx["other"] / "gqsa_report.json")
    elif op == "bad_digest":
        report["files"][shard.name] = "0" * 63 + "g"
        rep.write_text(json.dumps(report))
    return f"{shard.name} changed; report {op}", "refuse"


def m_paths(folder, rng, ctx):
    """Files that lead out of the folder: symlinks, shard index paths; or files of the wrong kind."""
    other = ctx["other"]
    op = rng.choice(["symlink_shard_other", "symlink_shard_same_outside", "symlink_config_outside", "symlink_loop",
                     "symlink_inside", "index_escape", "index_absolute", "shard_is_dir", "shard_is_fifo",
                     "symlink_dangling", "symlink_tokenizer_outside"])
    shard = rng.choice(_shards(folder))
    expect = "refuse"
    if op == "symlink_shard_other":
        shard.unlink()
        shard.symlink_to(other / shard.name)
        _refresh(folder)
    elif op == "symlink_shard_same_outside":  # identical content, but outside: refused all the same
        outside = ctx["scratch"] / f"copy-{rng.randrange(10**9)}-{shard.name}"
        shutil.copy(shard, outside)
        shard.unlink()
        shard.symlink_to(outside)
    elif op == "symlink_config_outside":
        outside = ctx["scratch"] / f"config-{rng.randrange(10**9)}.json"
        shutil.copy(folder / "config.json", outside)
        (folder / "config.json").unlink()
        (folder / "config.json").symlink_to(outside)
    elif op == "symlink_tokenizer_outside":
        outside = ctx["scratch"] / f"tok-{rng.randrange(10**9)}.json"
        shutil.copy(folder / "tokenizer.json", outside)
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer.json").symlink_to(outside)
    elif op == "symlink_loop":
        shard.unlink()
        shard.symlink_to(shard.name)
    elif op == "symlink_dangling":
        shard.unlink()
        shard.symlink_to(folder / "nowhere.safetensors")
    elif op == "symlink_inside":  # a link to a file of the same folder: the same bytes, may load
        moved = folder / f"blob-{shard.stem}.safetensors"
        shard.rename(moved)
        shard.symlink_to(moved.name)
        _refresh(folder)
        expect = "either"
    elif op in ("index_escape", "index_absolute"):
        index = folder / "model.safetensors.index.json"
        if not index.is_file():
            index.write_text(json.dumps({"metadata": {}, "weight_map": {
                n: shard.name for n in load_file(shard)}}))
        doc = json.loads(index.read_text())
        key = rng.choice(sorted(doc["weight_map"]))
        target = (f"../{other.name}/{doc['weight_map'][key]}" if op == "index_escape"
                  else str(other / doc["weight_map"][key]))
        doc["weight_map"] = {k: (target if v == doc["weight_map"][key] else v) for k, v in doc["weight_map"].items()}
        index.write_text(json.dumps(doc))
        _refresh(folder)
    elif op == "shard_is_dir":
        shard.unlink()
        shard.mkdir()
    elif op == "shard_is_fifo":
        shard.unlink()
        os.mkfifo(shard)
    return f"{shard.name}: {op}", expect


def m_files(folder, rng, ctx):
    """A file deleted, added or replaced by another of the folder."""
    files = _files(folder)
    op = rng.choice(["delete", "add_unlisted", "add_readme", "replace", "interrupted", "stale_marker"])
    expect = "refuse"
    if op == "delete":
        f = rng.choice(files)
        f.unlink()
        desc = f"{f.name} deleted"
    elif op == "add_unlisted":
        name = rng.choice(["extra.safetensors", "added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
                           "modeling_evil.py"])
        (folder / name).write_text('{"x": 1}')
        desc = f"{name} added"
        expect = "either" if name == "modeling_evil.py" else "refuse"
    elif op == "add_readme":
        (folder / "README.md").write_text("# a model card\n")
        desc, expect = "README.md added", "either"
    elif op == "replace":
        a, b = rng.sample(files, 2)
        shutil.copy(b, a)
        desc = f"{a.name} replaced by {b.name}"
    elif op == "interrupted":  # what a killed save leaves: the marker and maybe not all files
        (folder / ".gqsa-incomplete").write_text("")
        if rng.random() < 0.5:
            rng.choice(files).unlink()
        desc = "interrupted save (marker)"
    else:
        (folder / ".gqsa-incomplete").write_text("")
        desc = "marker only"
    return desc, expect


def m_remote_code(folder, rng, ctx):
    """config.json or tokenizer_config.json asking for custom code (auto_map), fixed checksums."""
    f = folder / rng.choice(["config.json", "tokenizer_config.json"])
    doc = json.loads(f.read_text())
    doc["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                       "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    f.write_text(json.dumps(doc))
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    _refresh(folder)
    return f"{f.name}: auto_map", "refuse"


MUTATIONS = {
    "flip_bytes": m_flip_bytes,
    "truncate": m_truncate,
    "append": m_append,
    "tensor_semantic": m_tensor,
    "safetensors_header": m_header,
    "json_wrong_type": m_json_type,
    "json_nonfinite_or_deep": m_json_nonfinite,
    "huge_dims": m_huge_dims,
    "layer_map": m_layer_map,
    "checksum_removed": m_checksum_removed,
    "paths_and_links": m_paths,
    "files": m_files,
    "remote_code": m_remote_code,
}
OUTCOMES = ("refused", "equal", "ugly", "accepted", "crash")


# ---------------------------------------------------------------------------------------------- runner

class Fuzzer:
    def __init__(self, bases: list[Path], workdir: Path, seed: int = 0):
        """``bases``: intact folders (e.g. one single-file and one sharded); ``workdir``: scratch space."""
        import gqsa

        self.bases, self.seed = bases, seed
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ctx = {"scratch": self.workdir / "scratch"}
        self.ctx["scratch"].mkdir(exist_ok=True)
        self.reference = {}
        for base in bases:
            model, tok = gqsa.load(base)
            self.reference[base] = self._outputs(model, tok)
        # "another checkpoint": the first base with its final norm doubled, and valid checksums of its own
        other = self.workdir / "other"
        if not other.exists():
            shutil.copytree(bases[0], other)
            for shard in _shards(other):
                t = load_file(shard)
                for k in t:
                    if k.endswith("model.norm.weight"):
                        t[k] = t[k] * 2
                save_file(t, shard, metadata={"format": "pt"})
            _refresh(other)
        self.ctx["other"] = other

    @staticmethod
    def _outputs(model, tok):
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT])).logits
        ids = tok(TEXT).input_ids if tok is not None else None
        return logits, ids

    def case(self, i: int) -> dict:
        import gqsa
        from gqsa import FormatError

        rng = random.Random(self.seed * 1_000_003 + i)
        names = list(MUTATIONS)
        cls = names[i % len(names)]
        base = self.bases[(i // len(names)) % len(self.bases)]
        folder = self.workdir / f"case-{i}"
        if folder.exists() or folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder, symlinks=True)
        row = {"case": i, "class": cls, "base": base.name}
        try:
            row["mutation"], row["expect"] = MUTATIONS[cls](folder, rng, self.ctx)
        except Exception as e:  # a bug of the fuzzer itself: reported, never silently skipped
            row.update(mutation=f"fuzzer error {type(e).__name__}: {e}", expect="either", outcome="crash", seconds=0.0)
            return row
        t0 = time.perf_counter()
        try:
            try:
                model, tok = gqsa.load(folder)
            except FormatError as e:
                msg = str(e)
                good = "\n" not in msg and str(folder) in msg
                row["outcome"] = "refused" if good else "ugly"
                row["message"] = msg[:300]
            except (RecursionError, MemoryError) as e:
                row.update(outcome="crash", message=f"{type(e).__name__}: {e}"[:300])
            except Exception as e:
                row.update(outcome="ugly", message=f"{type(e).__name__}: {e}"[:300],
                           where=traceback.format_exc().strip().splitlines()[-3][:200])
            else:
                try:
                    logits, ids = self._outputs(model, tok)
                except Exception as e:
                    row.update(outcome="crash", message=f"after loading: {type(e).__name__}: {e}"[:300])
                else:
                    ref_logits, ref_ids = self.reference[base]
                    same = torch.equal(logits, ref_logits) and ids == ref_ids
                    row["outcome"] = "equal" if same and row["expect"] == "either" else "accepted"
                    if not same:
                        row["message"] = "loaded with different outputs"
                    elif row["expect"] == "refuse":
                        row["message"] = "loaded although it must be refused"
        finally:
            row["seconds"] = round(time.perf_counter() - t0, 3)
            if row.get("outcome") not in ("crash", "ugly") and row["seconds"] > SLOW_S:
                row["outcome"] = "crash"
                row["message"] = f"took {row['seconds']} s (limit {SLOW_S} s)"
            shutil.rmtree(folder, ignore_errors=True)
        return row

    def run(self, n: int, start: int = 0, log=None) -> list[dict]:
        rows = []
        for i in range(start, start + n):
            rows.append(self.case(i))
            if log and (i + 1) % 500 == 0:
                log(f"{i + 1} cases")
        return rows


def table(rows: list[dict]) -> str:
    counts = defaultdict(Counter)
    for r in rows:
        counts[r["class"]][r["outcome"]] += 1
    slow = defaultdict(float)
    for r in rows:
        slow[r["class"]] = max(slow[r["class"]], r["seconds"])
    lines = ["| mutation class | cases | " + " | ".join(OUTCOMES) + " | slowest case (s) |",
             "|---|---:|" + "---:|" * len(OUTCOMES) + "---:|"]
    total = Counter()
    for cls in MUTATIONS:
        c = counts[cls]
        total.update(c)
        lines.append(f"| {cls} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES)
                     + f" | {slow[cls]:.2f} |")
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES)
                 + f" | {max(slow.values()):.2f} |")
    return "\n".join(lines)


def make_bases(root: Path) -> list[Path]:
    """Intact stories260K folders (W4 S50 G16 one-shot): single-file and sharded."""
    import importlib.util

    # tests/conftest.py by its path: under pytest the module name "conftest" may be another folder's
    spec = importlib.util.spec_from_file_location("gqsa_tests_conftest", Path(__file__).parent / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    ASSETS, compressed_folder = conftest.ASSETS, conftest.compressed_folder

    single = compressed_folder(root, "stories260K-w4s50g16", ASSETS / "models/stories260K/stories260K.bin",
                               ASSETS / "models/stories260K/tok512.bin", ASSETS / "data/wikitext2/wiki.valid.tokens")
    return [single, sharded_copy(single, root / "gqsa-serving" / "stories260K-sharded")]


def sharded_copy(single: Path, out: Path) -> Path:
    import gqsa

    if not (out / "config.json").is_file():
        model, tok = gqsa.load(single)
        gqsa.save(model, out, tok, overwrite=True, max_shard_size="100KB")
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=int(os.environ.get("GQSA_FUZZ_CASES", 1000)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/gqsa-fuzz")
    p.add_argument("--json", default=None, help="write every case as JSON lines here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.workdir)
    bases = make_bases(work)
    fz = Fuzzer(bases, work / "cases", args.seed)
    t0 = time.time()
    rows = fz.run(args.cases, log=lambda m: print(m, f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True))
    print(table(rows))
    print(f"\n{len(rows)} cases, seed {args.seed}, {time.time() - t0:.0f} s")
    bad = [r for r in rows if r["outcome"] in ("ugly", "accepted", "crash")]
    for r in bad[:50]:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
