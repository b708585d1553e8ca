"""load_model: the real local models, and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch
import transformers

from gqsa.models import load_model

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def greedy(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_gutenberg_folder(asset):
    model, tok = load_model(str(asset("models/gutenberg-llama-22m")))
    assert not model.training and model.dtype == torch.float32
    assert model.generation_config.pad_token_id is not None
    text = greedy(model, tok, "It was a dark and stormy night; the rain fell in torrents", 10)
    assert text.startswith(", the rain fell, the rain fell")


def test_stories260k_file(asset):
    model, tok = load_model(asset("models/stories260K/stories260K.bin"), dtype="fp32")  # tok512.bin found beside it
    assert not model.training and len(tok) == 512
    assert model.generation_config.pad_token_id == 2
    out = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=40, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith(STORY)


def test_explicit_tokenizer(asset, tmp_path):
    link = tmp_path / "model.bin"
    link.symlink_to(asset("models/stories260K/stories260K.bin"))
    with pytest.raises(ValueError, match=r"model.bin: no tokenizer beside it.*--tokenizer"):
        load_model(link)
    model, tok = load_model(link, tokenizer=asset("models/stories260K/tok512.bin"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tok("Once").input_ids[0] == 1
    with pytest.raises(ValueError, match="tokenizer has 32000 tokens but model.bin has 512"):
        load_model(link, tokenizer=asset("models/llama2-tokenizer/tokenizer.model"))
    (tmp_path / "tokenizer.model").symlink_to(asset("models/llama2-tokenizer/tokenizer.model"))
    with pytest.raises(ValueError, match="no tokenizer beside it has the model's 512 tokens"):
        load_model(link)


def test_missing_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match="no such file or folder.*hub id"):
        load_model(str(missing))


def test_hub_id_failure(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="some-org/some-model: not a local file or folder.*couldn't connect"):
        load_model("some-org/some-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="is not a model folder: no config.json"):
        load_model(tmp_path)


def test_folder_without_tokenizer(asset, tmp_path):
    src = asset("models/gutenberg-llama-22m")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(src / name)
    with pytest.raises(ValueError, match="no tokenizer files.*--tokenizer"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.txt", b"just some text that is long enough to have a header" * 2, "unknown model file"),
        ("weights.safetensors", b"\0" * 64, "pass the folder that holds config.json"),
        ("model.bin", b"\1\0\0\0" * 20, "not a llama2.c checkpoint"),
    ],
)
def test_not_a_model_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_bad_dtype(asset):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(asset("models/stories260K/stories260K.bin"), dtype="int3")


def test_tokenizer_of_another_vocabulary_is_refused_for_a_folder(asset):
    """Both directions on a model folder: a smaller tokenizer (tok512 for a 32000-token model) and a larger one."""
    g22m = asset("models/gutenberg-llama-22m")
    with pytest.raises(ValueError, match="tokenizer has 512 tokens, far fewer than the model's 32000"):
        load_model(g22m, tokenizer=asset("models/stories260K/tok512.bin"))
    model, tok = load_model(g22m, tokenizer=asset("models/llama2-tokenizer/tokenizer.model"))  # the same 32000
    assert len(tok) == 32000



def test_larger_tokenizer_than_the_model_is_refused(asset, tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "tiny")  # 96 tokens
    with pytest.raises(ValueError, match="tokenizer has 512 tokens, more than the model's 96"):
        load_model(tmp_path / "tiny", tokenizer=asset("models/stories260K/tok512.bin"))
