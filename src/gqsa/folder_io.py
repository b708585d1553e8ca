"""Writing a checkpoint folder safely: atomic folder replacement (temporary sibling, marker, fsync, rename),
atomic JSON files, and the sha256 checksums ``gqsa_report.json`` records."""
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

REPORT = "gqsa_report.json"
INCOMPLETE = ".gqsa-incomplete"  # marker file of a folder that is still being written
# files a folder may hold without a checksum (nothing reads them); everything else must be listed
UNCHECKED = re.compile(r"^(README.*|LICEN[CS]E.*|NOTICE.*|\.gitattributes|.*\.md|gqsa_report\.json.*)$")


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
        raise FileExistsError(f"{folder} already exists; choose another folder or overwrite it (overwrite=True; "
                              "--overwrite on the command line)")
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


def checksummed_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not UNCHECKED.match(f.name) and f.name != INCOMPLETE)


def write_report(folder: Path, report: dict | None) -> None:
    """``gqsa_report.json`` in ``folder``, with the sha256 of every other file there."""
    report = dict(report or {})
    report["files"] = {f.name: sha256(f) for f in checksummed_files(folder)}
    (folder / REPORT).write_text(json.dumps(_finite_json(report), indent=2, allow_nan=False))


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
