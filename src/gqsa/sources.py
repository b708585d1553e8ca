"""Where a model and a text come from, decided without torch: a model is a local file, a folder with a
``config.json`` or a Hugging Face hub id (``org/name``); a text is a local file or a dataset's short name
(:data:`HF_DATASETS`). The commands check their arguments with :func:`check_model_source` and
:func:`check_text_source` before they import torch and transformers (and before a model is loaded), so that a
mistyped path fails in a fraction of a second; :mod:`gqsa.models.loader` and :func:`gqsa.calib.read_text` apply the
same rules (and load)."""
from __future__ import annotations

import re
from pathlib import Path

# Hub datasets by short name: (dataset, config, split for calibration, split for evaluation, field, joiner)
HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text", "\n\n"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence", " "),
    "c4": ("allenai/c4", "en", "train", "validation", "text", " "),
}
SELF = "self"  # the calibration "text" sampled from the model itself (gqsa.calib.self_tokens)
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


def check_text_source(source: str) -> None:
    """Raise :func:`gqsa.calib.read_text`'s one-line error for a text argument that is neither a file nor a dataset
    name: a folder (``ValueError``), a missing path (``FileNotFoundError``). Files and dataset names pass."""
    path = Path(source).expanduser()
    if path.is_file():
        return
    if path.exists():
        raise ValueError(f"{source} is a folder; pass a text file or a dataset name ({', '.join(HF_DATASETS)})")
    if source not in HF_DATASETS:
        raise FileNotFoundError(f"{source}: no such file, and not a known dataset name ({', '.join(HF_DATASETS)})")
