"""`gqsa compress --stages …`: options recorded in the report; a run interrupted mid-BQPO resumes with
--resume to bitwise the same checkpoint."""
import json

import pytest
import torch

from gqsa import checkpoint, cli
from gqsa.stages import workdir as wd

from stages_helpers import make_llama

TEXT = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her "
        "friend Tom. One day they found a big red ball under a tree and they played until the sun went down. ")


@pytest.fixture
def setup(tmp_path, asset):
    model = make_llama(vocab=512)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TEXT * 40)
    tok = asset("models/stories260K/tok512.bin")
    args = ["compress", str(tmp_path / "model"), "--tokenizer", str(tok), "--calib", str(tmp_path / "calib.txt"),
            "--nsamples", "12", "--seqlen", "40", "--batch-size", "4", "--bits", "3", "--preset", "fast",
            "--bqpo-epochs", "2", "--bqpo-lr-weight", "0.1", "--e2e-epochs", "1", "--e2e-lr", "0.01"]
    return tmp_path, args


def _gqsa_lines(capsys):
    """gqsa's own stderr lines (the progress bars' lines aside)."""
    err = capsys.readouterr().err.replace("\r", "\n")
    return [line.strip() for line in err.splitlines() if line.strip().startswith("gqsa ")]


def test_interrupted_compress_resumes_to_the_same_checkpoint(setup, monkeypatch, capsys):
    tmp, args = setup
    assert cli.main(args + ["--out", str(tmp / "a")]) == 0
    assert not (tmp / "a.partial").exists()  # removed once the checkpoint is written
    rep = json.loads((tmp / "a" / "gqsa_report.json").read_text())
    assert rep["stage"] == "bqpo+e2e" and rep["preset"] == "fast"
    cfg = rep["config"]
    assert cfg["bqpo_epochs"] == 2 and cfg["e2e_epochs"] == 1 and cfg["bqpo_patience"] == 2  # preset, then options
    assert rep["calibration"]["train_windows"] == 10 and rep["calibration"]["val_windows"] == 2
    assert len(rep["stages"]["bqpo"]) == 2 and len(rep["stages"]["e2e"]["epochs"]) == 1 and not rep["resumed"]

    save = wd.BlockStore.save

    def save_then_interrupt(self, index, packed, stats):
        save(self, index, packed, stats)
        raise KeyboardInterrupt  # Ctrl-C (or a kill) right after block 0 is on disk

    monkeypatch.setattr(wd.BlockStore, "save", save_then_interrupt)
    out = str(tmp / "b")
    capsys.readouterr()
    assert cli.main(args + ["--out", out]) == 130
    assert not (tmp / "b").exists() and (tmp / "b.partial" / "block_0000.safetensors").is_file()
    # one line that says what was kept and how to go on
    assert _gqsa_lines(capsys) == [f"gqsa compress: interrupted; 1 finished block kept in {out}.partial: the same "
                                   "command with --resume continues from there"]
    monkeypatch.setattr(wd.BlockStore, "save", save)
    assert cli.main(args + ["--out", out]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(args + ["--out", out, "--resume"]) == 0
    assert not (tmp / "b.partial").exists()
    a, b = checkpoint.read_tensors(tmp / "a"), checkpoint.read_tensors(tmp / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    rep = json.loads((tmp / "b" / "gqsa_report.json").read_text())
    assert rep["resumed"] and [s.get("resumed", False) for s in rep["stages"]["bqpo"]] == [True, False]


def test_resume_with_other_settings_is_refused_with_a_clear_message(setup, monkeypatch, capsys):
    tmp, args = setup
    monkeypatch.setattr(wd.BlockStore, "save", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out = ["--out", str(tmp / "c"), "--stages", "bqpo"]
    capsys.readouterr()
    assert cli.main(args + out) == 130
    assert _gqsa_lines(capsys) == ["gqsa compress: interrupted"]  # nothing kept: nothing to say
    assert cli.main(args + out + ["--resume", "--sparsity", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "config.sparsity: was 0.5, now 0.3" in err


def test_sigkill_mid_bqpo_then_resume_gives_bitwise_the_same_checkpoint(setup):
    """A real kill (SIGKILL of the process, no clean-up runs) while block 1 trains; ``--resume`` finishes
    from block 0's file and the packed tensors equal those of an uninterrupted run bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp, args = setup
    args[args.index("--bqpo-epochs") + 1] = "40"  # block 1 trains for seconds: time to kill it mid-way
    args += ["--bqpo-patience", "40"]
    assert cli.main(args + ["--out", str(tmp / "a")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from gqsa.cli import main; "
           "sys.exit(main(sys.argv[1:]))", *args, "--out", str(tmp / "b")]
    proc = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = tmp / "b.partial"
    deadline = time.time() + 300
    while not (work / "block_0000.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "block 0 was never written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp / "b").exists() and not (work / "block_0001.safetensors").exists()  # killed mid-block 1
    done = subprocess.run(run + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = checkpoint.read_tensors(tmp / "a"), checkpoint.read_tensors(tmp / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    rep = json.loads((tmp / "b" / "gqsa_report.json").read_text())
    assert [s.get("resumed", False) for s in rep["stages"]["bqpo"]] == [True, False]
