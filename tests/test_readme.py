"""README.md's Python API example runs as written (extracted from README.md, so the two cannot drift), against
the local assets, and writes a folder whose gqsa_report.json holds the settings."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def readme_block(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```\n<!-- /{marker} -->", README.read_text(), re.DOTALL)
    assert m, f"README.md has no <!-- {marker} --> block"
    return m.group(1)


@pytest.mark.slow
def test_python_api_example_runs(assets, tmp_path):
    code = readme_block("python-api")
    assert '"../shared/assets"' in code
    work = tmp_path / "project"  # the example's paths are relative to the project root: ../shared/assets
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "assets").symlink_to(assets)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GQSA_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + code], cwd=work,
                         capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = map(float, re.search(r"held-out perplexity: ([\d.]+) -> ([\d.]+)", run.stdout).groups())
    assert before == pytest.approx(54.347, abs=0.01)  # tests/eval/test_ppl.py's reference, first 16 windows
    assert before < after < 2.5 * before  # pruned and quantized: worse, not broken
    assert "It was a dark and stormy night" in run.stdout
    report = json.loads((work / "runs" / "gutenberg-w4s30g16-api" / "gqsa_report.json").read_text())
    assert report["config"]["sparsity"] == 0.3 and report["config"]["bits"] == 4
    assert report["config"]["stages"] == "oneshot"
    assert report["calibration"]["nsamples"] == 16 and report["calibration"]["seqlen"] == 512
    assert report["totals"]["compressed_layers"] == 42 and len(report["layers"]) == 42


def test_readme_test_command_is_what_ci_runs():
    assert "python -m pytest -q" in readme_block("test-command")
    assert "test-command" in (Path(__file__).parents[1] / ".ci" / "run").read_text()
