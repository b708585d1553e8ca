"""Where a model comes from, decided without torch: a local file, a folder with a ``config.json``, or a Hugging
Face hub id (``org/name``). The commands check their model argument with :func:`check_model_source` before they
import torch and transformers, so that a mistyped path fails in a fraction of a second instead of after the
imports; :mod:`gqsa.models.loader` applies the same rules (and loads)."""
from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub id (``org/name``, no ``..``)."""
    return bool(HUB_ID.match(name)) and ".." not in name


def check_model_source(name: str) -> None:
    """Raise the loader's one-line error for a model argument that can be neither loaded from disk nor asked of the
    hub: a missing path that is not a hub id (``FileNotFoundError``), a folder without ``config.json``
    (``ValueError``). Files and hub ids pass (the loader checks what they hold)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: is not a model folder: no config.json (for a llama2.c checkpoint pass its .bin "
                             "file)")
    elif not path.is_file() and not is_hub_id(str(name)):
        raise FileNotFoundError(f"{name}: no such file or folder (and not a Hugging Face hub id like 'org/name')")
