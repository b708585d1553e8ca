"""The work folder of a trained run: each finished BQPO block is written there, so a killed run can
continue (``gqsa compress … --resume``) and end bitwise as an uninterrupted one.

Layout: ``state.json`` (the fingerprint of the run: the settings that change BQPO's result, a
hash of the calibration tokens and of the model, the block count) and one
``block_NNNN.safetensors`` per finished block holding its packed layers (``<layer>.<tensor>``) with
the layers' shapes and the block's statistics in the safetensors metadata. Every file is written to
a temporary name and renamed, so a kill never leaves a half-written block behind. No pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..format import TENSOR_NAMES, PackedLinear

STATE = "state.json"
VERSION = 1


def tensor_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def block_path(folder, index: int) -> Path:
    """The file of finished block ``index`` in the work folder ``folder``."""
    return Path(folder) / f"block_{index:04d}.safetensors"


def finished_blocks(folder, n_blocks: int | None = None) -> int:
    """How many leading blocks of the work folder ``folder`` are finished (at most ``n_blocks``; a later block
    after a gap is not trusted)."""
    k = 0
    while (n_blocks is None or k < n_blocks) and block_path(folder, k).is_file():
        k += 1
    return k


class BlockStore:
    """Finished blocks of one run in ``folder``.

    ``resume=False`` refuses a folder that already holds a run (so a partial result is never
    silently lost); ``resume=True`` continues one whose fingerprint equals ``fingerprint`` (any
    difference is named), or starts afresh when there is none.
    """

    def __init__(self, folder, fingerprint: dict, resume: bool = False, notes: dict | None = None):
        """``notes``: circumstances that may change the last bits of the result without making a
        resume wrong (e.g. the CPU thread count): a difference is warned about, not refused."""
        self.folder = Path(folder)
        self.fingerprint = {"version": VERSION, **fingerprint}
        self.notes = dict(notes or {})
        state = self.folder / STATE
        if self.folder.exists() and any(self.folder.iterdir()):
            if not resume:
                raise FileExistsError(f"{self.folder} holds an unfinished run; pass --resume (resume=True) to "
                                      f"continue it, or remove the folder to start over")
            if not state.is_file():
                raise ValueError(f"{self.folder} is not a gqsa work folder (no {STATE}); remove it to start over")
            saved = json.loads(state.read_text())
            old_notes = saved.pop("notes", {})
            old, new = _flat(saved), _flat(self.fingerprint)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                detail = "; ".join(f"{k}: was {_short(old.get(k))}, now {_short(new.get(k))}" for k in diff)
                raise ValueError(f"cannot resume from {self.folder}: the run differs in {detail}. Use the same "
                                 f"model, calibration and settings, or remove the folder to start over")
            changed = {k: (old_notes.get(k), v) for k, v in self.notes.items() if old_notes.get(k) != v}
            if changed:
                warnings.warn(f"resuming {self.folder} with other {', '.join(changed)} "
                              f"({'; '.join(f'{k}: {a} → {b}' for k, (a, b) in changed.items())}): the result may "
                              f"differ in the last bits from an uninterrupted run", stacklevel=3)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(state, json.dumps({**self.fingerprint, "notes": self.notes}, indent=2).encode())

    def path(self, index: int) -> Path:
        return block_path(self.folder, index)

    def finished(self, n_blocks: int) -> int:
        """How many leading blocks are finished (a later block after a gap is not trusted)."""
        return finished_blocks(self.folder, n_blocks)

    def save(self, index: int, packed: dict[str, PackedLinear], stats: dict) -> None:
        tensors, meta = {}, {}
        for name, p in packed.items():
            for t in TENSOR_NAMES:
                tensors[f"{name}.{t}"] = getattr(p, t).contiguous().cpu()
            meta[name] = {"shape": list(p.shape), "bits": p.bits, "group_size": p.group_size}
        tmp = self.path(index).with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"layers": json.dumps(meta), "stats": json.dumps(stats)})
        os.replace(tmp, self.path(index))

    def load(self, index: int) -> tuple[dict[str, PackedLinear], dict]:
        from safetensors import safe_open

        path = self.path(index)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        layers = json.loads(meta["layers"])
        packed = {}
        for name, m in layers.items():
            p = PackedLinear.from_tensors(tensors, name, m["shape"], m["bits"], m["group_size"])
            p.validate(f"{path.name}: {name}")
            packed[name] = p
        return packed, json.loads(meta["stats"])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
