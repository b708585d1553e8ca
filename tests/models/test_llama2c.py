"""The llama2.c checkpoint reader: real stories260K generation, other layouts, bad files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from gqsa.models import load_llama2c, load_llama2c_tokenizer
from gqsa.models.llama2c import read_llama2c_header

EXPECTED_STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def bin_path(asset):
    return asset("models/stories260K/stories260K.bin")


@pytest.fixture(scope="module")
def model(bin_path):
    return load_llama2c(bin_path)


def legacy_blocks(path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """Header ints and the float32 blocks of a tied legacy checkpoint, in file order (llama2.c run.c)."""
    data = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 0)
    kv, hd = dim * n_kv // n_heads, dim // n_heads
    sizes = [
        ("emb", vocab * dim), ("att_norm", n_layers * dim), ("wq", n_layers * dim * dim),
        ("wk", n_layers * kv * dim), ("wv", n_layers * kv * dim), ("wo", n_layers * dim * dim),
        ("ffn_norm", n_layers * dim), ("w1", n_layers * hidden * dim), ("w2", n_layers * dim * hidden),
        ("w3", n_layers * hidden * dim), ("norm", dim), ("freq", seq_len * hd),
    ]  # fmt: skip
    flat = np.frombuffer(data, dtype="<f4", offset=28)
    blocks, pos = {}, 0
    for name, n in sizes:
        blocks[name] = flat[pos : pos + n]
        pos += n
    assert pos == flat.size
    return (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len), blocks


def test_config(model):
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.max_position_embeddings == 512 and c.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training


def test_greedy_story(model, asset):
    tok = load_llama2c_tokenizer(asset("models/stories260K/tok512.bin"))
    out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith(EXPECTED_STORY)


def test_dtype(bin_path, model):
    m16 = load_llama2c(bin_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids = torch.tensor([[1, 400, 300, 200]])
    ref = model(ids).logits
    assert torch.allclose(m16(ids).logits.float(), ref, atol=0.1 * ref.abs().max().item())


def test_untied_classifier(bin_path, model, tmp_path):
    ints, b = legacy_blocks(bin_path)
    head = list(ints)
    head[5] = -head[5]  # negative vocab: a classifier follows
    path = tmp_path / "untied.bin"
    path.write_bytes(struct.pack("<7i", *head) + b"".join(x.tobytes() for x in b.values()) + b["emb"].tobytes())
    untied = load_llama2c(path)
    assert not untied.config.tie_word_embeddings
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 400, 300, 200]])
    torch.testing.assert_close(untied(ids).logits, model(ids).logits)


def test_version1_layout(bin_path, model, tmp_path):
    ints, b = legacy_blocks(bin_path)
    header = struct.pack("<Ii7iB", 0x616B3432, 1, *ints, 1)
    header += b"\0" * (256 - len(header))
    order = ["att_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]  # export.py v1
    path = tmp_path / "v1.bin"
    path.write_bytes(header + b"".join(b[k].tobytes() for k in order))
    assert read_llama2c_header(path).version == 1
    ids = torch.tensor([[1, 400, 300, 200]])
    torch.testing.assert_close(load_llama2c(path)(ids).logits, model(ids).logits)


def test_truncated(bin_path, tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(bin_path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut.bin: expected \d+ bytes for a llama2.c checkpoint with dim=64.*found"):
        load_llama2c(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PK\x03\x04" + b"\0" * 60, "zip/pickle"),
        (b"\0" * 10, "too short"),
        (struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + b"\0" * 64, "not a llama2.c checkpoint"),
        (struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 300, "version 2"),
        (b"hello world, this is text, not weights at all" * 3, "not a llama2.c checkpoint"),
    ],
)
def test_not_llama2c(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_llama2c(path)
    with pytest.raises(FileNotFoundError):
        load_llama2c(tmp_path / "missing.bin")


def test_save_pretrained_round_trip(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)  # safetensors: every tensor owns its storage
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 400, 300, 200]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
