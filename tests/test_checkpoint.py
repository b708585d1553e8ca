import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gqsa
from gqsa import FormatError, GQSAConfig, checkpoint
from gqsa.nn import GQSALinear


@pytest.fixture
def compressed(tiny_llama):
    torch.manual_seed(0)
    tokens = torch.randint(0, 96, (8, 32))
    gqsa.compress(tiny_llama, GQSAConfig(bits=4, group_size=16, sparsity=0.5, stages="oneshot"), tokens, device="cpu",
                  progress=False)
    return tiny_llama, tokens


def test_compress_replaces_every_block_linear(compressed):
    model, _ = compressed
    names = [n for n, m in model.named_modules() if isinstance(m, GQSALinear)]
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)


def test_saved_folder_loads_back_with_bitwise_equal_logits(compressed, tmp_path):
    model, tokens = compressed
    out = gqsa.save(model, tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "gqsa_report.json",
                                                      "model.safetensors"]
    assert list(tmp_path.iterdir()) == [out]  # no temporary folder left behind
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gqsa" and len(qc["layers"]) == 14
    loaded, tok = gqsa.load(out)
    assert tok is None
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    gen = loaded.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


def test_load_arguments_are_checked_first(compressed, tmp_path):
    """gqsa.load(folder, device=…, dtype=…) from Python: a device this PyTorch cannot use was an AssertionError from
    inside torch after the folder was read, a dtype name an "Invalid device string"; now one ValueError each, and a
    dtype may be given by name."""
    model, tokens = compressed
    out = gqsa.save(model, tmp_path / "ck")
    with pytest.raises(ValueError, match="^device 'cdua': not a device name"):
        gqsa.load(out, device="cdua")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device 'cuda': this PyTorch .* has no CUDA GPU to use"):
            gqsa.load(out, device="cuda")
    with pytest.raises(ValueError, match=r"^dtype 'float64': the dense tensors load as one of float32, float16, "
                                         r"bfloat16 \(or None: as stored\)$"):
        gqsa.load(out, dtype="float64")
    loaded, _ = gqsa.load(out, dtype="bfloat16")
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(FileExistsError, match=r"already exists; choose another folder or overwrite it \(overwrite="):
        gqsa.save(model, out)  # (the API's words, not the command line's)


def test_sharded_checkpoint(compressed, tmp_path):
    model, tokens = compressed
    out = gqsa.save(model, tmp_path / "ck", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    loaded, _ = gqsa.load(out)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_failed_save_leaves_no_folder(compressed, tmp_path, monkeypatch):
    model, _ = compressed

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        gqsa.save(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_kept_unless_overwrite(compressed, tmp_path):
    model, _ = compressed
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        gqsa.save(model, tmp_path / "ck")
    gqsa.save(model, tmp_path / "ck", overwrite=True)
    assert (tmp_path / "ck" / "model.safetensors").is_file()


def test_uncompressed_model_cannot_be_saved_as_gqsa(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="compress it"):
        gqsa.save(tiny_llama, tmp_path / "ck")


@pytest.fixture
def folder(compressed, tmp_path):
    return gqsa.save(compressed[0], tmp_path / "ck")


def test_truncated_file_is_refused(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FormatError, match="checksum"):
        gqsa.load(folder)
    with pytest.raises(FormatError, match="not a readable safetensors"):
        gqsa.load(folder, verify=False)


def test_tampered_row_ptr_is_refused(folder):
    path = folder / "model.safetensors"
    t = load_file(path)
    t["model.layers.0.mlp.up_proj.row_ptr"][-1] += 5
    save_file(t, path)
    with pytest.raises(FormatError, match="checksum"):
        gqsa.load(folder)
    with pytest.raises(FormatError, match="up_proj.*row_ptr"):
        gqsa.load(folder, verify=False)


@pytest.mark.parametrize("edit,message", [
    (lambda qc: qc.update(quant_method="awq"), "quant_method 'awq' is not 'gqsa'"),
    (lambda qc: qc.update(format_version=99), "format version 99"),
    (lambda qc: qc["layers"]["model.layers.0.mlp.up_proj"].update(shape=[88, 32]), "up_proj: col_idx out of range"),
    (lambda qc: qc["layers"].update({"model.layers.0.mlp.nope": {"shape": [1, 1], "bits": 4, "group_size": 16}}),
     "lack its tensor|does not exist"),
])
def test_bad_quantization_config_is_refused(folder, edit, message):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="config.json"):  # the checksum, if nothing before it
        gqsa.load(folder)
    checkpoint.refresh_checksums(folder)
    with pytest.raises(FormatError, match=message):
        gqsa.load(folder)


def test_model_config_that_disagrees_with_the_tensors_is_refused(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    checkpoint.refresh_checksums(folder)
    with pytest.raises(FormatError, match="gate_proj is \\[88, 64\\] in quantization_config but \\[80, 64\\]"):
        gqsa.load(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FormatError, match="no config.json"):
        gqsa.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        gqsa.load(tmp_path / "missing")


def test_saved_files_have_the_usual_modes_and_are_fsynced_before_the_rename(compressed, tmp_path, monkeypatch):
    import os

    events = []
    real_fsync, real_rename = os.fsync, type(tmp_path).rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(type(tmp_path), "rename",
                        lambda self, target: (events.append(("rename", str(self))), real_rename(self, target))[1])
    out = gqsa.save(compressed[0], tmp_path / "ck")
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes  # model.safetensors too (it was 0600)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    renamed = next(i for i, e in enumerate(events) if e[0] == "rename")
    synced = {Path(p).name for kind, p in events[:renamed] if kind == "fsync"}
    assert set(modes) <= synced  # every file, then the folder itself, before the rename
    assert any(kind == "fsync" and Path(p).name.startswith(".ck.") for kind, p in events[:renamed])


KILLED_SAVE = """
import os, signal, sys
from gqsa import checkpoint
with checkpoint.atomic_folder(sys.argv[1]) as tmp:
    (tmp / "config.json").write_text("{}")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_save_leaves_a_folder_that_is_refused_and_cleaned_by_the_next_save(compressed, tmp_path):
    import subprocess
    import sys

    target = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert not target.exists()
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.")]
    assert (left / checkpoint.INCOMPLETE).is_file()
    with pytest.raises(FormatError, match="temporary folder of an interrupted save"):
        gqsa.load(left)
    gqsa.save(compressed[0], target)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # the leftover of the dead process is gone
    assert not (target / checkpoint.INCOMPLETE).exists()


def test_a_live_save_of_another_process_is_left_alone(tmp_path, compressed):
    import os

    busy = tmp_path / f".ck.{os.getppid()}.abcd.tmp"  # a process that is alive
    busy.mkdir()
    gqsa.save(compressed[0], tmp_path / "ck")
    assert busy.is_dir()


def test_checksum_verification_cannot_be_switched_off_by_damaging_the_report(folder):
    report = folder / checkpoint.REPORT
    path = folder / "model.safetensors"
    t = load_file(path)
    t["model.norm.weight"] = t["model.norm.weight"] * 2  # a valid but different model
    save_file(t, path, metadata={"format": "pt"})
    for damage, message in [
        (lambda: None, "gqsa_report.json is missing"),  # deleted
        (lambda: report.mkdir(), "gqsa_report.json is missing or not a regular file"),
        (lambda: report.write_text('{"files": {}}'), "no checksum for"),
        (lambda: report.write_text('{"files": []}'), "'files' must map"),
        (lambda: report.write_text("[1]"), "holds a JSON list"),
        (lambda: report.write_text(""), "not valid JSON"),
    ]:
        if report.is_dir():
            report.rmdir()
        elif report.exists():
            report.unlink()
        damage()
        with pytest.raises(FormatError, match=message):
            gqsa.load(folder)
    if report.is_dir():
        report.rmdir()
    loaded, _ = gqsa.load(folder, verify=False)  # only verify=False (--no-verify) switches it off
    assert torch.equal(loaded.model.norm.weight, t["model.norm.weight"])


def test_shard_index_cannot_point_outside_the_folder(compressed, tmp_path):
    model, _ = compressed
    out = gqsa.save(model, tmp_path / "ck", max_shard_size="20KB")
    other = gqsa.save(model, tmp_path / "other", max_shard_size="20KB")
    index = out / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = sorted(set(doc["weight_map"].values()))[0]
    doc["weight_map"] = {k: (f"../other/{v}" if v == first else v) for k, v in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    checkpoint.refresh_checksums(out)
    with pytest.raises(FormatError, match="maps to '../other/.*no paths allowed"):
        gqsa.load(out, verify=False)
    (out / first).unlink()
    (out / first).symlink_to(other / first)
    doc["weight_map"] = {k: v.removeprefix("../other/") for k, v in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="symbolic link to .*outside the checkpoint folder"):
        gqsa.load(out, verify=False)


@pytest.mark.parametrize("key,value,message", [
    ("num_hidden_layers", 100000, "num_hidden_layers is 100000, expected an integer in"),
    ("vocab_size", 10**9, "vocab_size is 1000000000"),
    ("num_hidden_layers", 3, "num_hidden_layers is 3 but the tensors hold layers 0..1"),
    ("hidden_size", 64.0, "hidden_size is 64.0 .float., expected int"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps is '1e-5'"),
])
def test_config_limits_and_types_are_checked_before_anything_is_built(folder, key, value, message, monkeypatch):
    import transformers

    def never(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", never)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    checkpoint.refresh_checksums(folder)
    with pytest.raises(FormatError, match=message):
        gqsa.load(folder)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_config_numbers_are_refused(folder, text):
    path = folder / "config.json"
    path.write_text(path.read_text().replace('"rms_norm_eps": 1e-06', f'"rms_norm_eps": {text}'))
    assert text in path.read_text()
    checkpoint.refresh_checksums(folder)
    with pytest.raises(FormatError, match="config.json.*(not valid JSON|rms_norm_eps is)"):
        gqsa.load(folder)


def test_non_finite_dense_tensor_is_refused(folder):
    path = folder / "model.safetensors"
    t = load_file(path)
    t["model.norm.weight"][3] = float("nan")
    save_file(t, path, metadata={"format": "pt"})
    checkpoint.refresh_checksums(folder)
    with pytest.raises(FormatError, match="model.safetensors: tensor model.norm.weight holds NaN"):
        gqsa.load(folder)


def test_dense_tensors_are_cast_to_the_requested_dtype_after_validation(folder):
    model, _ = gqsa.load(folder, dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
