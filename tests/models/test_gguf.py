"""GGUF input: a tiny llama GGUF written here with the ``gguf`` package loads equal to its dequantized
reference (weights, logits, tokenizer), and ``gqsa compress/eval`` take the file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from gqsa.models import load_model  # noqa: E402
from gqsa.models.gguf import is_gguf, load_gguf  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
TEXT = "the quick brown fox jumps over the lazy dog. "


def _byte_tokens():
    """GPT-2's byte → printable-unicode table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order of the q/k projections (what its converter writes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q8_0 bytes, their dequantized float32 values) of a float32 matrix."""
    q = gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return q, gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).astype(np.float32)


def write_tiny_gguf(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama (GQA, tied embeddings, Q8_0 matrices, F32 norms, byte-level BPE tokenizer) at
    ``path``; returns the expected Hugging Face state dict (dequantized, q/k rows in HF order)."""
    rng = np.random.default_rng(seed)
    tokens = _byte_tokens()
    merges = ["t h", "th e", "Ġ the", "o w", "Ġ f"]
    tokens += [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    expected = {}

    def matrix(gguf_name, hf_name, shape, permute_heads=None):
        m = (rng.standard_normal(shape) * 0.08).astype(np.float32)
        stored = _permute(m, permute_heads) if permute_heads else m
        q, deq = _q8(stored)
        w.add_tensor(gguf_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        _, expected[hf_name] = _q8(m)  # Q8_0 blocks run along rows: the row order does not change them
        assert np.array_equal(_permute(expected[hf_name], permute_heads) if permute_heads else expected[hf_name], deq)

    def norm(gguf_name, hf_name):
        v = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        w.add_tensor(gguf_name, v)
        expected[hf_name] = v

    matrix("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN))
    for i in range(LAYERS):
        b, p = f"blk.{i}", f"model.layers.{i}"
        norm(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight")
        matrix(f"{b}.attn_q.weight", f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN), HEADS)
        matrix(f"{b}.attn_k.weight", f"{p}.self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN), KV_HEADS)
        matrix(f"{b}.attn_v.weight", f"{p}.self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN))
        matrix(f"{b}.attn_output.weight", f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        norm(f"{b}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight")
        matrix(f"{b}.ffn_gate.weight", f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN))
        matrix(f"{b}.ffn_up.weight", f"{p}.mlp.up_proj.weight", (INTER, HIDDEN))
        matrix(f"{b}.ffn_down.weight", f"{p}.mlp.down_proj.weight", (HIDDEN, INTER))
    norm("output_norm.weight", "model.norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_gguf(path)


def test_tiny_gguf_equals_dequantized_reference(tiny_gguf):
    from transformers import LlamaConfig, LlamaForCausalLM

    path, expected = tiny_gguf
    assert is_gguf(path)
    model, tok = load_model(path)  # the tokenizer comes from the file itself
    assert not model.training and model.dtype == torch.float32
    assert "quantization_config" not in model.config.to_dict()  # a plain dense model now
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.tie_word_embeddings) == (HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, True)
    state = model.state_dict()
    for name, ref in expected.items():
        assert torch.equal(state[name], torch.from_numpy(ref)), name
    # the same weights in a model built by hand give the same logits
    ref_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True)).eval()
    ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref_model(ids).logits, atol=1e-5, rtol=1e-5)
    # the byte-level BPE of the file: merges applied, lossless round trip
    assert len(tok) == expected["model.embed_tokens.weight"].shape[0]
    assert tok.convert_tokens_to_ids("Ġthe") in ids[0].tolist()
    assert tok.decode(ids[0], skip_special_tokens=True) == TEXT


def test_gguf_tokenizer_option(tiny_gguf):
    path, _ = tiny_gguf
    model, tok = load_gguf(path)
    _, tok2 = load_model(path, tokenizer=path)
    assert tok2(TEXT).input_ids == tok(TEXT).input_ids


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValueError, match=r"model.gguf: not a GGUF file"):
        load_model(bad)


def test_cli_compress_and_eval_gguf(tiny_gguf, tmp_path, capsys):
    from gqsa.cli import main

    path, _ = tiny_gguf
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40)
    out = tmp_path / "tiny-w4s50g16"
    assert main(["compress", str(path), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
                 "--stages", "oneshot", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gqsa"
    assert json.loads((out / "gqsa_report.json").read_text())["model"] == str(path)
    assert main(["eval", str(path), "--ppl", str(text), "--context", "32", "--max-windows", "2"]) == 0
    assert main(["eval", str(out), "--ppl", str(text), "--context", "32", "--max-windows", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "perplexity" in ln]
    assert len(lines) == 2


def test_report_on_a_gguf_file(tiny_gguf, tmp_path):
    from gqsa import report_matrix as rm

    path, _ = tiny_gguf
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 40)
    rows = [r for r in rm.default_rows() if r.name in ("fp16", "gqsa-w4s50g16")]
    rep = rm.run_report(str(path), str(text), str(text), tmp_path / "report", rows=rows, context=32, nsamples=4,
                        tasks=[], kl_windows=1, max_windows=2, device="cpu", progress=False, log=lambda *a: None)
    assert [r["name"] for r in rep["rows"]] == ["fp16", "gqsa-w4s50g16"]
    assert rep["rows"][1]["bits_per_weight"] < 16 and rep["rows"][1]["ppl"]["ppl"] > 0
