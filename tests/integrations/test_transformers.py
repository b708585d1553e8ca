"""`import gqsa` makes `AutoModelForCausalLM.from_pretrained(folder)` load GQSA checkpoints."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import gqsa
from gqsa import FormatError, checkpoint
from gqsa.bench.runner import dense_from_gqsa
from gqsa.nn import GQSALinear


@pytest.fixture(params=["s260k", "g22m"])
def folder(request):
    return request.getfixturevalue(f"{request.param}_folder")


def _prompt(tok):
    return torch.tensor([tok("It was a dark and stormy night").input_ids])


def test_from_pretrained_builds_gqsa_layers_equal_to_gqsa_load(folder):
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    names = {n for n, m in model.named_modules() if isinstance(m, GQSALinear)}
    assert names == set(qc["layers"])
    assert model.config.quantization_config.quant_method == "gqsa"
    ref, tok = gqsa.load(folder)
    ids = _prompt(tok)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    for name, m in ref.named_modules():
        if isinstance(m, GQSALinear):
            mine = model.get_submodule(name)
            for t in ("row_ptr", "col_idx", "qweight", "scales", "zeros"):
                assert torch.equal(getattr(mine, t), getattr(m, t)), (name, t)


def test_generate_reproduces_the_reference_path(folder):
    """Greedy generation of the loaded model equals (a) gqsa.load's model forced onto the pure-torch
    reference and (b) the same weights dequantized into plain nn.Linear layers."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = _prompt(tok)
    got = model.generate(ids, max_new_tokens=12, do_sample=False)
    ref, _ = gqsa.load(folder)
    for m in ref.modules():
        if isinstance(m, GQSALinear):
            m.backend = "reference"
    assert torch.equal(got, ref.generate(ids, max_new_tokens=12, do_sample=False))
    dense = dense_from_gqsa(gqsa.load(folder)[0], torch.float32)
    assert not any(isinstance(m, GQSALinear) for m in dense.modules())
    assert torch.equal(got, dense.generate(ids, max_new_tokens=12, do_sample=False))
    assert got.shape[1] == ids.shape[1] + 12


@pytest.fixture
def copy_of(s260k_folder, tmp_path):
    def make():
        out = tmp_path / "ck"
        shutil.copytree(s260k_folder, out)
        return out
    return make


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))
    checkpoint.refresh_checksums(folder)  # the loader's own checks, not the checksum, must refuse it


def _edit_tensors(folder, fn):
    t = load_file(folder / "model.safetensors")
    fn(t)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    checkpoint.refresh_checksums(folder)


LAYER = "model.layers.0.self_attn.q_proj"


def test_unknown_quant_method_fails_loudly(copy_of):
    f = copy_of()
    _edit_config(f, lambda qc: qc.update(quant_method="gqsa-v9"))
    with pytest.raises(FormatError, match="quant_method 'gqsa-v9'"):
        AutoModelForCausalLM.from_pretrained(f)
    with pytest.raises(FormatError, match="quant_method 'gqsa-v9' is not 'gqsa'"):
        gqsa.load(f)


def test_unsupported_format_version_fails(copy_of):
    f = copy_of()
    _edit_config(f, lambda qc: qc.update(format_version=99))
    with pytest.raises(FormatError, match="format version 99"):
        AutoModelForCausalLM.from_pretrained(f)


def test_tampered_tensor_shape_fails(copy_of):
    f = copy_of()
    _edit_tensors(f, lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:-1].contiguous()}))
    with pytest.raises(FormatError, match=r"q_proj: qweight has shape \[\d+, 8\], expected"):
        AutoModelForCausalLM.from_pretrained(f)
    with pytest.raises(FormatError):
        gqsa.load(f)


def test_inconsistent_row_ptr_fails(copy_of):
    f = copy_of()

    def shift(t):
        rp = t[f"{LAYER}.row_ptr"].clone()
        rp[1] += 1
        t[f"{LAYER}.row_ptr"] = rp
    _edit_tensors(f, shift)
    with pytest.raises(FormatError, match="q_proj"):
        AutoModelForCausalLM.from_pretrained(f)


def test_missing_tensor_fails(copy_of):
    f = copy_of()
    _edit_tensors(f, lambda t: t.pop(f"{LAYER}.scales"))
    with pytest.raises(FormatError, match=rf"{LAYER}(, but the .safetensors files lack its| lacks) tensor\(s\) scales"):
        AutoModelForCausalLM.from_pretrained(f)


def test_layer_shape_disagreeing_with_model_config_fails(copy_of):
    f = copy_of()
    _edit_config(f, lambda qc: qc["layers"][LAYER].update(shape=[7, 64]))
    # (the packed tensors contradict the layer map before the model config does)
    with pytest.raises(FormatError, match=r"q_proj(: row_ptr has shape \[65\], expected \[8\]| is \[7, 64\] in)"):
        AutoModelForCausalLM.from_pretrained(f)


def test_configs_of_other_methods_pass_through_untouched():
    from transformers.quantizers.auto import AutoHfQuantizer

    # a foreign, unregistered method without GQSA's layer map: transformers' own behaviour (a warning)
    assert AutoHfQuantizer.supports_quant_method({"quant_method": "some-other-method", "bits": 4}) is False
    assert AutoHfQuantizer.supports_quant_method({"quant_method": "gqsa"}) is True


def test_edited_file_fails_its_checksum(copy_of):
    f = copy_of()
    t = load_file(f / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"] * 2
    save_file(t, f / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="model.safetensors: checksum does not match"):
        AutoModelForCausalLM.from_pretrained(f)


def test_layer_removed_from_the_layer_map_fails(copy_of):
    """It used to load as a randomly initialised dense layer."""
    f = copy_of()
    _edit_config(f, lambda qc: qc["layers"].pop(LAYER))
    with pytest.raises(FormatError, match=f"packed layer {LAYER} that quantization_config does not list"):
        AutoModelForCausalLM.from_pretrained(f)


def test_missing_dense_tensor_fails(copy_of):
    """It used to be initialised at random, with a warning."""
    f = copy_of()
    _edit_tensors(f, lambda t: t.pop("model.layers.1.input_layernorm.weight"))
    with pytest.raises(FormatError, match="missing .*model.layers.1.input_layernorm.weight"):
        AutoModelForCausalLM.from_pretrained(f)


def test_extra_tensor_fails(copy_of):
    f = copy_of()
    _edit_tensors(f, lambda t: t.update({"model.layers.1.surprise.weight": torch.zeros(3)}))
    with pytest.raises(FormatError, match="not in the model .*surprise"):
        AutoModelForCausalLM.from_pretrained(f)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].view(torch.float8_e4m3fn)}),
     "qweight (has dtype torch.float8_e4m3fn|holds NaN)"),
    (lambda t: t.update({f"{LAYER}.zeros": torch.full_like(t[f"{LAYER}.zeros"], float("nan"), dtype=torch.float16)}),
     "NaN"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].clone().fill_(float("inf"))}), "NaN or infinite"),
])
def test_tensors_are_validated_as_stored_before_any_cast(copy_of, edit, message):
    """transformers casts tensors to the buffers' dtypes: a float8 qweight or NaN float zeros used to pass."""
    f = copy_of()
    _edit_tensors(f, edit)
    with pytest.raises(FormatError, match=message):
        AutoModelForCausalLM.from_pretrained(f)
    with pytest.raises(FormatError, match=message):
        gqsa.load(f)
