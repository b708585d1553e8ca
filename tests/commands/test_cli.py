"""End to end through the command line on the real stories260K checkpoint, and the bad-input matrix:
one clear error line, exit status 2, no partial output folder."""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gqsa.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def compress_args(stories260k, asset, out, *extra):
    model, tok = stories260k
    return ["compress", str(model), "--tokenizer", str(tok), "--calib", str(asset("data/wikitext2/wiki.valid.tokens")),
            "--nsamples", "16", "--seqlen", "128", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def folder(stories260k, asset, run_dir):
    out = run_dir / "s260-w4s50g16"
    assert main(compress_args(stories260k, asset, out, "--bits", "4", "--group-size", "16", "--sparsity", "0.5")) == 0
    return out


def test_compress_says_in_one_line_when_calibration_windows_overlap(stories260k, asset, run_dir, capsys):
    """More windows than the calibration text holds: one warning line from gqsa (no source path, no code line),
    and the run goes on."""
    model, tok = stories260k
    text = run_dir / "short.txt"
    text.write_text(asset("data/wikitext2/wiki.valid.tokens").read_text()[:1000])
    out = run_dir / "s260-overlap"
    assert main(["compress", str(model), "--tokenizer", str(tok), "--calib", str(text), "--nsamples", "16",
                 "--seqlen", "128", "--stages", "oneshot", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and lines[0].startswith("gqsa compress: warning: calibration: 16 windows of 128 tokens"), err
    assert "calib.py" not in err and (out / "model.safetensors").is_file()


def test_compress_says_when_seqlen_is_longer_than_the_models_context(stories260k, asset, run_dir, capsys):
    """--seqlen beyond max_position_embeddings (512 for stories260K): one warning line, windows of the context."""
    model, tok = stories260k
    out = run_dir / "s260-long"
    assert main(["compress", str(model), "--tokenizer", str(tok), "--calib", str(asset("data/wikitext2/wiki.valid.tokens")),
                 "--nsamples", "2", "--seqlen", "4096", "--stages", "oneshot", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    want = ("gqsa compress: warning: --seqlen 4096 is longer than the model's context (512 positions): "
            "calibrating on windows of 512 tokens")
    assert lines == [want], err
    assert json.loads((out / "gqsa_report.json").read_text())["calibration"]["seqlen"] == 512


def test_compress_writes_a_complete_folder(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "gqsa_report.json", "tokenizer.json"} <= names
    rep = json.loads((folder / "gqsa_report.json").read_text())
    assert rep["config"]["sparsity"] == 0.5 and rep["calibration"]["nsamples"] == 16
    assert len(rep["layers"]) == 35 and rep["environment"]["torch"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_eval_appends_to_the_report(folder, asset, capsys):
    text = asset("data/wikitext2/wiki.test.raw")
    assert main(["eval", str(folder), "--ppl", str(text), "--max-windows", "8"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "8 windows = 4096 tokens evaluated" in out
    rep = json.loads((folder / "gqsa_report.json").read_text())
    assert rep["evaluations"][-1]["windows"] == 8 and rep["evaluations"][-1]["context"] == 512
    assert rep["evaluations"][-1]["evaluated_tokens"] == 8 * 512


def test_inspect_bits_per_weight_matches_the_design_formula(folder, capsys):
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for row in info["layers"]:
        n, k = row["shape"]
        if k % 16 == 0:  # exact formula, plus the one extra row_ptr entry per layer
            assert row["bits_per_weight"] == pytest.approx(row["design_bits_per_weight"] + 32 / (n * k), abs=1e-3)
    assert info["totals"]["size_vs_fp16"] < 0.6
    # row allocation: per-row masks; a tiny layer (4 groups per row) may still fall into row clusters by chance
    layouts = [row["kernel_layout"] for row in info["layers"]]
    assert set(layouts) <= {"irregular"} | {f"cluster{r}" for r in (16, 32, 64, 128)} and "irregular" in layouts
    assert sum(info["totals"]["kernel_layouts"].values()) == len(layouts)
    # the GPU estimate: the dense tensors as stored, each compressed layer's bytes times its layouts' factor
    from gqsa.kernels.block_layout import RESIDENT_PER_PACKED_BYTE as f

    packed = sum(row["bytes"] for row in info["layers"])
    gpu = info["totals"]["gpu_bytes_estimate"]
    dense = gpu - sum(int(f["irregular" if row["kernel_layout"] == "irregular" else "block"] * row["bytes"])
                      for row in info["layers"])
    assert 0 < dense < info["totals"]["safetensors_bytes"] - packed + 4096  # (the header and indices aside)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "bits/weight" in out and f"{layouts.count('irregular')} irregular" in out
    assert f"on a GPU, with the kernels' layouts: about {gpu:,} bytes of weights" in out


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_model_file(asset, stories260k, run_dir, capsys):
    out = run_dir / "never"
    args = compress_args(stories260k, asset, out)
    args[1] = str(run_dir / "nope.bin")
    assert main(args) == 2
    assert "nope.bin" in _err(capsys) and not out.exists()


def test_folder_that_is_not_a_model(asset, stories260k, run_dir, capsys):
    (run_dir / "empty").mkdir()
    out = run_dir / "never"
    args = compress_args(stories260k, asset, out)
    args[1] = str(run_dir / "empty")
    assert main(args) == 2
    assert "no config.json" in _err(capsys) and not out.exists()
    assert main(["eval", str(run_dir / "empty"), "--ppl", "x.txt"]) == 2
    assert "config.json" in _err(capsys)


def test_existing_output_is_not_touched(folder, asset, stories260k, capsys):
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert main(compress_args(stories260k, asset, folder)) == 2
    assert "already exists" in _err(capsys)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("opt,value,message", [("--sparsity", "1.5", "sparsity"), ("--nsamples", "0", "nsamples")])
def test_bad_settings(opt, value, message, asset, stories260k, run_dir, capsys):
    out = run_dir / "never"
    assert main(compress_args(stories260k, asset, out, opt, value)) == 2
    assert message in _err(capsys) and not out.exists()


@pytest.mark.parametrize("extra, message", [(["--quantize-lm-head", "8", "--method", "gptq"], "applies to --method gqsa"),
                                            (["--quantize-lm-head", "8", "--e2e-train-zero"], "e2e-train-zero")])
def test_quantize_lm_head_refuses_what_it_cannot_do(extra, message, asset, stories260k, run_dir, capsys):
    out = run_dir / "never"
    assert main(compress_args(stories260k, asset, out, *extra)) == 2
    err = _err(capsys)
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_block_allocation_packs_the_same_columns_in_every_16_rows(stories260k, asset, run_dir, capsys):
    out = run_dir / "s260-block16"
    assert main(compress_args(stories260k, asset, out, "--stages", "oneshot", "--allocation", "block16")) == 0
    tensors = load_file(str(out / "model.safetensors"))
    layers = [k[: -len(".row_ptr")] for k in tensors if k.endswith(".row_ptr")]
    assert layers
    for name in layers:
        row_ptr, col_idx = tensors[f"{name}.row_ptr"].long(), tensors[f"{name}.col_idx"]
        rows = [col_idx[row_ptr[r]:row_ptr[r + 1]] for r in range(len(row_ptr) - 1)]
        assert all(torch.equal(rows[r], rows[r - r % 16]) for r in range(len(rows))), name
    assert json.loads((out / "gqsa_report.json").read_text())["config"]["allocation"] == "block16"
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert all(row["kernel_layout"] in ("block16", "block32", "block64", "block128") for row in info["layers"])


def test_cli_allocation_choices_are_the_configs():
    from gqsa import cli, config
    assert cli.ALLOCATIONS == config.ALLOCATIONS


def copy_folder(folder, dst):
    dst.mkdir()
    for p in folder.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("case", ["truncated", "tampered", "row_ptr", "quant_method", "zero_dim"])
def test_bad_checkpoints_are_refused(case, folder, run_dir, capsys):
    bad = copy_folder(folder, run_dir / f"bad-{case}")
    st = bad / "model.safetensors"
    extra = []
    if case == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
        expect = "checksum"
    elif case == "tampered":
        data = bytearray(st.read_bytes())
        data[-100] ^= 0xFF
        st.write_bytes(bytes(data))
        expect = "checksum"
    elif case == "row_ptr":
        t = load_file(st)
        t["model.layers.2.self_attn.o_proj.row_ptr"][3] = 10**6
        save_file(t, st)
        extra, expect = ["--no-verify"], "o_proj: row_ptr"
    elif case == "zero_dim":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["shape"] = [0, 64]
        (bad / "config.json").write_text(json.dumps(cfg))
        expect = "up_proj needs shape [N, K] (positive integers)"
    else:
        cfg = json.loads((bad / "config.json").read_text())
        cfg["quantization_config"]["quant_method"] = "gptq"
        (bad / "config.json").write_text(json.dumps(cfg))
        expect = "quant_method 'gptq'"
    assert main(["inspect", str(bad), *extra]) == 2
    assert expect in _err(capsys)
    text = run_dir / "unused.txt"  # (a text that exists: a missing one would be refused first, before the folder)
    text.write_text("never read")
    assert main(["eval", str(bad), "--ppl", str(text), *extra]) == 2
    assert expect in _err(capsys)


def test_console_script_prints_help_and_one_line_errors(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gqsa.cli", "compress", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--group-size" in ok.stdout and "wikitext2" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gqsa.cli", "inspect", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_version_and_help_do_not_load_torch():
    """`gqsa --help` / `--version` parse before any heavy import (torch, transformers)."""
    code = ("import sys\nfrom gqsa.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    for argv in (["--version"], ["--help"], ["eval", "--help"]):
        run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    import gqsa

    version = subprocess.run([sys.executable, "-m", "gqsa.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"gqsa {gqsa.__version__}"


def test_a_mistyped_path_or_option_fails_before_torch_is_imported(tmp_path):
    """A missing model path, a folder without config.json, a missing text and the option errors that need no model
    are one line and exit status 2 before torch or transformers are imported (0.1 s instead of the ~10 s of the
    imports, and before any model is loaded)."""
    code = ("import sys\nfrom gqsa.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'\nsys.exit(rc)\n")
    missing = str(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "m").mkdir()  # a model folder as far as these checks go
    (tmp_path / "m" / "config.json").write_text("{}")
    model = str(tmp_path / "m")
    cases = [
        (["compress", model, "--calib", missing, "--out", str(tmp_path / "o")], "not a known dataset name"),
        (["compress", model, "--calib", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "is a folder"),
        (["eval", model, "--ppl", str(tmp_path / "file.txt"), missing], "not a known dataset name"),
        (["eval", model, "--ppl", str(tmp_path / "file.txt"), "--kl-reference", model, "--kl-text", missing],
         "not a known dataset name"),
        (["report", model, "--calib", str(tmp_path / "file.txt"), "--eval", missing, "--out", str(tmp_path / "r")],
         "not a known dataset name"),
        (["compress", missing, "--calib", "x.txt", "--out", str(tmp_path / "o")], "no such file or folder"),
        (["compress", str(tmp_path / "empty"), "--calib", "x.txt", "--out", str(tmp_path / "o")], "no config.json"),
        (["eval", missing, "--ppl", "x.txt"], "no such file or folder"),
        (["eval", missing], "nothing to evaluate"),
        (["eval", str(tmp_path / "empty"), "--ppl", "x.txt", "--kl-reference", missing], "no config.json"),
        (["generate", missing, "--prompt", "hi"], "no such file or folder"),
        (["generate", missing, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["report", missing, "--calib", "c.txt", "--eval", "e.txt", "--out", str(tmp_path / "r")],
         "no such file or folder"),
        (["inspect", missing], "no such folder"),
        (["inspect", str(tmp_path / "file.txt")], "not a folder"),
        (["bench", missing], "no such folder"),
    ]
    for argv, expect in cases:
        run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and expect in lines[0], (argv, run.returncode, run.stderr)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_every_command_help_renders():
    """Every subcommand's help text formats (argparse expands ``%`` in help strings: a bare one breaks --help)."""
    import argparse

    from gqsa.commands import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) >= {"compress", "eval", "inspect", "report", "generate", "bench"}
    for name, sub in subs.choices.items():
        assert "usage: gqsa " + name in sub.format_help()


@pytest.mark.parametrize("argv", [["compress", "x", "--calib", "c", "--out", "o"], ["eval", "x", "--ppl", "t"],
                                  ["generate", "x", "--prompt", "p"], ["bench", "--synthetic", "tiny"],
                                  ["report", "x", "--calib", "c", "--eval", "e", "--out", "o"]])
def test_every_computing_command_takes_threads(argv, capsys):
    assert main([*argv, "--threads", "0"]) == 2
    assert "--threads must be positive" in _err(capsys)


def test_a_normal_run_prints_no_library_warnings(s260k_folder, asset, tmp_path):
    """`gqsa generate` and `gqsa eval` in a fresh process: no FutureWarning/DeprecationWarning/transformers notice."""
    env = {**__import__("os").environ, "PYTHONWARNINGS": "default"}
    for argv in (["generate", str(s260k_folder), "--prompt", "Once upon a time", "--max-new-tokens", "4"],
                 ["eval", str(s260k_folder), "--ppl", str(asset("data/wikitext2/wiki.test.raw")), "--max-windows", "1"]):
        run = subprocess.run([sys.executable, "-m", "gqsa.cli", *argv], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        noise = [l for l in run.stderr.splitlines() if "Warning" in l or "deprecated" in l or l.startswith("[transformers]")]
        assert not noise, noise


def test_generate_stays_inside_the_models_context(s260k_folder, capsys):
    """stories260K has 512 positions: more new tokens than fit are cut to the room left, with one warning; a
    prompt that fills the context is one error line."""
    assert main(["generate", str(s260k_folder), "--prompt", "Once", "--max-new-tokens", "600", "--temperature",
                 "0"]) == 0
    out = capsys.readouterr()
    warn = [ln for ln in out.err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and re.fullmatch(r"gqsa generate: warning: --max-new-tokens 600: the prompt \((\d+) tokens\) "
                                           r"leaves room for (\d+) in the model's context \(512 positions\); "
                                           r"generating at most \2", warn[0]), out.err
    prompt_len = int(re.search(r"prompt \((\d+) tokens", warn[0])[1])
    made = int(re.search(r"\[(\d+) tokens;", out.err + out.out)[1])
    assert 0 < made <= 512 - prompt_len
    assert main(["generate", str(s260k_folder), "--prompt", "Once upon a time " * 200]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"gqsa generate: error: the prompt takes \d+ tokens, the model's whole "
                                          r"context \(512 positions\) or more: shorten it", err[0]), err
