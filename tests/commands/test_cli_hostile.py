"""Hostile and broken folders through the command line: every command that reads a model folder answers a
damaged one with exactly one stderr line and exit status 2; custom code in a folder never runs (stdin a
terminal or not); a non-finite perplexity is an error; gqsa's own bugs are one line too, with the traceback
under GQSA_DEBUG=1."""
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gqsa import checkpoint
from gqsa.cli import main

SRC = str(Path(__file__).parents[2] / "src")


def _edit_json(folder, name, fn):
    path = folder / name
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    t = load_file(path)
    fn(t)
    save_file(t, path, metadata={"format": "pt"})


def _nan_norm(t):
    name = next(k for k in t if k.endswith("norm.weight"))
    t[name] = t[name].clone()
    t[name][0] = float("nan")


EVIL = "import pathlib; pathlib.Path(__file__).with_name('CUSTOM_CODE_RAN').write_text('yes')\n"


def _auto_map(folder):
    _edit_json(folder, "config.json", lambda c: c.update(auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                                 "AutoModelForCausalLM": "modeling_evil.Evil"}))
    (folder / "modeling_evil.py").write_text(EVIL)


# name -> (damage, expected fragment of the error line); "fixed" ones re-record the checksums afterwards
DAMAGE = {
    "truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
                  "model.safetensors"),
    "nan_tensor": (lambda f: _edit_tensors(f, _nan_norm), "NaN"),
    "wrong_type": (lambda f: _edit_json(f, "config.json", lambda c: c.update(hidden_size="64")), "hidden_size"),
    "huge_layers": (lambda f: _edit_json(f, "config.json", lambda c: c.update(num_hidden_layers=100000)),
                    "num_hidden_layers"),
    "nan_config": (lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')), "NaN"),
    "bad_json": (lambda f: (f / "config.json").write_text('{"model_type": "llama",'), "config.json"),
    "auto_map": (_auto_map, "auto_map"),
}
GQSA_ONLY = {
    "no_report": (lambda f: (f / "gqsa_report.json").unlink(), "gqsa_report.json"),
    "layer_removed": (lambda f: _edit_json(f, "config.json", lambda c: c["quantization_config"]["layers"].pop(
        "model.layers.0.mlp.up_proj")), "up_proj"),
}


@pytest.fixture(scope="module")
def dense_folder(s260k_folder, tmp_path_factory, asset):
    """An uncompressed stories260K folder (what `compress` and `report` read)."""
    from gqsa.models.llama2c import load_llama2c

    out = tmp_path_factory.mktemp("dense") / "stories260K-hf"
    model = load_llama2c(asset("models/stories260K/stories260K.bin"), dtype=torch.float32)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(s260k_folder / f, out / f)
    return out


def _damaged(base, tmp, name, damage):
    out = tmp / name
    shutil.copytree(base, out)
    damage(out)
    if name not in ("truncated", "no_report") and (out / checkpoint.REPORT).is_file():
        checkpoint.refresh_checksums(out)  # so that the loader's own checks are what refuses it
    return out


def _one_error_line(capsys):
    captured = capsys.readouterr()
    # (transformers' "Loading weights: 100%|███|" progress bar may come first: it is not an error line)
    err = [line for line in captured.err.strip().splitlines() if not re.search(r"\d+%\|", line)]
    assert len(err) == 1, err
    assert "Traceback" not in captured.err
    return err[0]


def _commands(folder, tmp, text):
    return {
        "eval": ["eval", str(folder), "--ppl", str(text), "--max-windows", "1"],
        "inspect": ["inspect", str(folder)],
        "generate": ["generate", str(folder), "--prompt", "Once upon a time", "--max-new-tokens", "2"],
        "bench": ["bench", str(folder), "--batch", "1", "--prompt-len", "2", "--new-tokens", "2", "--repeats", "1"],
        "report": ["report", str(folder), "--calib", str(text), "--eval", str(text), "--out", str(tmp / "report"),
                   "--rows", "fp16", "--tasks", "--kl-windows", "0", "--max-windows", "1"],
    }


@pytest.mark.parametrize("case", sorted(DAMAGE) + sorted(GQSA_ONLY))
def test_damaged_gqsa_folder(case, s260k_folder, tmp_path, asset, capsys):
    damage, expect = {**DAMAGE, **GQSA_ONLY}[case]
    folder = _damaged(s260k_folder, tmp_path, case, damage)
    for command, argv in _commands(folder, tmp_path, asset("data/wikitext2/wiki.test.raw")).items():
        assert main(argv) == 2, command
        line = _one_error_line(capsys)
        assert line.startswith(f"gqsa {command}: error: "), line
        assert expect in line and (command == "report" or str(folder) in line), (command, line)
    assert not (folder / "CUSTOM_CODE_RAN").exists()


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_uncompressed_folder(case, dense_folder, tmp_path, asset, capsys):
    damage, expect = DAMAGE[case]
    folder = _damaged(dense_folder, tmp_path, case, damage)
    commands = _commands(folder, tmp_path, asset("data/wikitext2/wiki.test.raw"))
    commands["compress"] = ["compress", str(folder), "--calib", str(asset("data/wikitext2/wiki.test.raw")),
                            "--nsamples", "2", "--seqlen", "32", "--stages", "oneshot", "--out", str(tmp_path / "o")]
    for command, argv in commands.items():
        assert main(argv) == 2, command
        line = _one_error_line(capsys)
        assert line.startswith(f"gqsa {command}: error: "), line
        if command not in ("bench", "inspect"):  # these two: "not a GQSA checkpoint" (when nothing else is)
            assert expect in line or case == "truncated" and "model" in line, (command, line)
    assert not (folder / "CUSTOM_CODE_RAN").exists() and not (tmp_path / "o").exists()


def _run_cli(argv, tty: bool):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    if not tty:
        return subprocess.run([sys.executable, "-m", "gqsa.cli", *argv], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, env=env, timeout=300)
    leader, follower = pty.openpty()
    try:
        os.write(leader, b"y\ny\ny\n")  # what a user answering transformers' "run the custom code?" would type
        return subprocess.run([sys.executable, "-m", "gqsa.cli", *argv], stdin=follower, capture_output=True,
                              text=True, env=env, timeout=300)
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.parametrize("kind,tty", [("uncompressed", True), ("gqsa", False)],
                         ids=["uncompressed-stdin-tty", "gqsa-stdin-not-tty"])  # (in-process: every command)
def test_auto_map_is_refused_and_no_code_runs(kind, tty, s260k_folder, dense_folder, tmp_path, asset):
    folder = _damaged(s260k_folder if kind == "gqsa" else dense_folder, tmp_path, "auto_map", _auto_map)
    r = _run_cli(["eval", str(folder), "--ppl", str(asset("data/wikitext2/wiki.test.raw")), "--max-windows", "1"],
                 tty)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "auto_map" in err[0] and "never" in err[0], r.stderr
    assert not (folder / "CUSTOM_CODE_RAN").exists()


def test_nan_perplexity_exits_nonzero_and_is_not_recorded(s260k_folder, tmp_path, asset, capsys, monkeypatch):
    import gqsa.eval.ppl as ppl

    folder = tmp_path / "ck"
    shutil.copytree(s260k_folder, folder)
    before = (folder / checkpoint.REPORT).read_text()
    monkeypatch.setattr(ppl, "perplexity", lambda *a, **k: {"ppl": float("nan"), "context": 8, "windows": 1,
                                                             "tokens": 8, "evaluated_tokens": 8, "seconds": 0.0})
    assert main(["eval", str(folder), "--ppl", str(asset("data/wikitext2/wiki.test.raw"))]) == 2
    assert "perplexity is nan" in _one_error_line(capsys)
    assert (folder / checkpoint.REPORT).read_text() == before


def test_a_bug_is_one_line_and_GQSA_DEBUG_shows_it(s260k_folder, capsys, monkeypatch):
    def bug(*a, **k):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(checkpoint, "packed_layers", bug)
    assert main(["inspect", str(s260k_folder)]) == 2
    line = _one_error_line(capsys)
    assert "internal error: TypeError: unsupported operand" in line and "GQSA_DEBUG=1" in line
    monkeypatch.setenv("GQSA_DEBUG", "1")
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["inspect", str(s260k_folder)])


def test_every_transformers_auto_call_passes_trust_remote_code_false():
    """A static check of gqsa's sources: every call of an Auto* class's from_pretrained / from_config (directly,
    or handed to a wrapper) says trust_remote_code=False."""
    import ast

    calls = []
    for path in sorted((Path(SRC) / "gqsa").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            refs = [n for n in [node.func, *node.args] if isinstance(n, ast.Attribute)
                    and n.attr in ("from_pretrained", "from_config") and isinstance(n.value, ast.Name)
                    and n.value.id.startswith("Auto")]
            if refs:
                ok = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert len(calls) >= 6, calls
    assert all(ok for _, ok in calls), [c for c, ok in calls if not ok]


def test_bench_refuses_a_synthetic_model_that_does_not_fit(monkeypatch, capsys):
    """A synthetic model larger than the free memory (a 7B in float32 on a CPU): one line before anything is
    built, instead of the out-of-memory killer; the same model runs where it fits."""
    from gqsa.bench import synthetic

    monkeypatch.setattr(synthetic, "available_memory", lambda device: 2 << 30)
    args = ["bench", "--synthetic", "llama-2-7b", "--device", "cpu", "--settings", "fp16", "--batch", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gqsa bench: error: --synthetic llama-2-7b with fp16 needs about 28.0 "
                                               "GB on cpu (a CPU computes in float32); 2.1 GB are free"), err
    assert "llama-2-7b-layers=N" in err[0]
    small = ["bench", "--synthetic", "tiny", "--device", "cpu", "--settings", "fp16", "--batch", "1",
             "--prompt-len", "2", "--new-tokens", "2", "--repeats", "1"]
    assert main(small) == 0


def test_compress_never_writes_over_its_own_inputs(tmp_path, capsys):
    """--out naming the model folder, a folder that holds it, or one that holds the calibration text: one error
    line before anything is read, and the inputs untouched (with --overwrite the folder would be replaced whole;
    this once destroyed a source model)."""
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    calib = tmp_path / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("some text " * 100)
    cases = ((model, "is the model"), (tmp_path / "models", "holds the model"), (tmp_path, "holds the model"),
             (tmp_path / "data", "holds the calibration text"))
    for out, says in cases:
        argv = ["compress", str(model), "--calib", str(calib), "--out", str(out), "--overwrite", "--stages", "oneshot"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"gqsa compress: error: --out {out} {says}"), err
        assert err[0].endswith("writing the compressed folder there would destroy it; choose another --out")
    assert (model / "config.json").read_text() == "{}" and calib.read_text() == "some text " * 100
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["calib.txt", "config.json", "data", "m", "models"]


def test_compress_refuses_a_compressed_model_and_a_binary_calibration_file(tmp_path, capsys):
    """A GQSA (or any quantized) checkpoint as the model, and a binary file as the calibration text (a model
    file passed by mistake: it tokenized 98 MB of bytes for minutes): one error line each, nothing written."""
    packed = tmp_path / "packed"
    packed.mkdir()
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gqsa"}}
    (packed / "config.json").write_text(json.dumps(config))
    assert main(["compress", str(packed), "--calib", "self", "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = (f"gqsa compress: error: {packed} is a compressed checkpoint already (config.json has a "
            f"quantization_config): compress the original model it was made from")
    assert err == [want], err
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 64)
    from gqsa import calib

    with pytest.raises(ValueError, match="is not a text file"):
        calib.read_text(str(binary))
    (tmp_path / "ok.txt").write_bytes("caf\xe9 text".encode("latin-1"))  # stray non-UTF-8 bytes stay readable
    assert calib.read_text(str(tmp_path / "ok.txt")) == "caf\ufffd text"
    assert not (tmp_path / "o1").exists()
    # a blank text file (calibration or evaluation): the error names it
    from types import SimpleNamespace

    from gqsa.eval.ppl import text_windows

    def words(text, **kw):  # a tokenizer without BOS: one token per word
        return SimpleNamespace(input_ids=torch.ones(1, len(text.split()), dtype=torch.long))

    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    for read in (lambda: calib.calibration_tokens(str(blank), words, nsamples=2, seqlen=4),
                 lambda: text_windows(str(blank), words, 4)):
        with pytest.raises(ValueError, match=f"^{blank}: the text is empty after tokenization"):
            read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose PyTorch has no CUDA")
def test_a_device_this_machine_cannot_use_is_one_line_before_anything_runs(tmp_path, capsys):
    """--device cuda on a CPU-only PyTorch, a misspelt device: one line naming the device (was "internal error:
    AssertionError: Torch not compiled with CUDA enabled", reported as a gqsa bug), no folder written."""
    from gqsa.modules import default_device

    assert default_device(None) == torch.device("cpu") and default_device("cpu") == torch.device("cpu")
    text = tmp_path / "t.txt"
    text.write_text("text " * 50)
    (tmp_path / "m").mkdir()  # a model folder as far as the checks before the imports go (a missing one fails there)
    (tmp_path / "m" / "config.json").write_text("{}")
    runs = {
        "compress": ["compress", str(tmp_path / "m"), "--calib", str(text), "--out", str(tmp_path / "o"), "--device",
                     "cuda"],
        "report": ["report", str(tmp_path / "m"), "--calib", str(text), "--eval", str(text), "--out",
                   str(tmp_path / "r"), "--device", "cuda:1"],
        "bench": ["bench", "--synthetic", "tiny", "--device", "cdua", "--batch", "1"],
    }
    for command, argv in runs.items():
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"gqsa {command}: error: device "), err
        assert ("has no CUDA GPU to use; use cpu (--device cpu)" in err[0]) != (command == "bench"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "t.txt"]


def test_compress_refuses_an_empty_out(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "m"), "--calib", "self", "--out", " "]) == 2
    assert capsys.readouterr().err.strip() == "gqsa compress: error: --out is empty: name the folder to write"


def test_compress_refuses_one_token_windows_before_loading(tmp_path, capsys):
    """--seqlen 1 failed only after the model was loaded and sampling had begun, in the sampler's words."""
    assert main(["compress", str(tmp_path / "no-model"), "--calib", "self", "--seqlen", "1", "--out",
                 str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == ("gqsa compress: error: --seqlen must be at least 2: a calibration "
                                               "window of one token has nothing to predict")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_counts_below_one_are_one_error_line(s260k_folder, asset, tmp_path, capsys):
    """eval --max-windows 0 / --batch-size 0 were internal errors from inside the model (a reshape of 0 elements,
    a split of size 0); report --max-windows 0 and negative --limit / --kl-windows likewise refused up front."""
    text = str(asset("data/wikitext2/wiki.test.raw"))
    for flag, value, want in (("--max-windows", "0", ">= 1"), ("--batch-size", "0", ">= 1"), ("--limit", "-1", ">= 1"),
                              ("--zeroshot-batch-size", "0", ">= 1"), ("--kl-windows", "0", ">= 1")):
        assert main(["eval", str(s260k_folder), "--ppl", text, flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"gqsa eval: error: {flag} must be {want}"
    for flag, value, want in (("--max-windows", "0", ">= 1"), ("--limit", "-1", ">= 0"),
                              ("--kl-windows", "-2", ">= 0")):
        assert main(["report", str(s260k_folder), "--calib", text, "--eval", text, "--out", str(tmp_path / "r"),
                     flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"gqsa report: error: {flag} must be {want}"
    assert not (tmp_path / "r").exists()


def test_a_wrong_kl_reference_is_refused_before_any_evaluation(s260k_folder, asset, tmp_path, capsys):
    """--kl-reference was loaded after the perplexity (and zero-shot) runs: a missing path or a model of another
    vocabulary threw their minutes away, and the results with them. Now it is loaded and checked first."""
    text = str(asset("data/wikitext2/wiki.test.raw"))
    report = (s260k_folder / "gqsa_report.json").read_text()
    for ref, says in ((str(tmp_path / "nope"), "no such file or folder"),
                      (str(asset("models/gutenberg-llama-22m")), "they must share a vocabulary")):
        assert main(["eval", str(s260k_folder), "--ppl", text, "--max-windows", "1", "--kl-reference", ref]) == 2
        out = capsys.readouterr()
        assert "perplexity" not in out.out and says in out.err
    assert (s260k_folder / "gqsa_report.json").read_text() == report
