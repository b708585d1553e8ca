"""``gqsa.sources``: what a model argument may be, decided without torch (the commands check it before their
imports; the loader applies the same rules)."""
import sys

import pytest

from gqsa.sources import HF_DATASETS, check_model_source, check_text_source, is_hub_id


def test_hub_ids():
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("org/name.v2")
    for name in ("name", "org/name/extra", "../x", "org/..", "/abs/path", "org/", "./x", "org/name-"):
        assert not is_hub_id(name), name


def test_check_model_source(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.bin").write_bytes(b"x")
    check_model_source(str(tmp_path / "m"))  # a model folder
    check_model_source(str(tmp_path / "model.bin"))  # a file: the loader checks what it holds
    check_model_source("org/not-on-this-disk")  # a hub id: asked of the hub later
    with pytest.raises(ValueError, match="no config.json"):
        check_model_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        check_model_source(str(tmp_path / "missing"))


def test_check_text_source(tmp_path):
    (tmp_path / "t.txt").write_text("some text")
    check_text_source(str(tmp_path / "t.txt"))
    for name in HF_DATASETS:  # read from the hub later
        check_text_source(name)
    with pytest.raises(ValueError, match="is a folder"):
        check_text_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a known dataset name"):
        check_text_source(str(tmp_path / "missing.txt"))


def test_the_module_imports_no_torch():
    import subprocess

    code = "import sys, gqsa.sources\nassert 'torch' not in sys.modules\n"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
