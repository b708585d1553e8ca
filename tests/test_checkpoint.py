import json

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
     "lacks tensor|does not exist"),
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
