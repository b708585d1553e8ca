"""The llama2.c tokenizer: identical ids to llama2.c's encode, round trips, save/reload, SentencePiece."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gqsa.models import load_llama2c_tokenizer

SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world! It's 2024: 3.14159 + 42 = 45.14159?",
    " leading space, and  two  spaces, trailing ",
    "tabs\tand\nnew lines\n\n= Heading =\n",
    "Unicode: naïve café, Ünïcödé ✓ 🙂 日本語 — “quotes”",
    "<s> literal specials </s> <unk> <0x41>",
    "a",
]


def read_tok_bin(path: Path) -> tuple[list[bytes], list[float]]:
    data = path.read_bytes()
    vocab, scores, off = [], [], 4
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        vocab.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return vocab, scores


def llama2c_encode(text: str, vocab: list[bytes], scores: list[float]) -> list[int]:
    """Pure-python transcription of llama2.c run.c ``encode(t, text, bos=1, eos=0)``."""
    lookup = {piece: i for i, piece in enumerate(vocab)}
    tokens = [lookup[b" "]] if text else []  # dummy prefix
    for ch in text:  # one UTF-8 code point at a time, byte fallback at id byte + 3
        raw = ch.encode("utf-8")
        tokens += [lookup[raw]] if raw in lookup else [b + 3 for b in raw]
    while True:  # merge the adjacent pair whose merged piece scores highest (leftmost on ties)
        best_score, best_idx, best_id = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            j = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]])
            if j is not None and scores[j] > best_score:
                best_score, best_idx, best_id = scores[j], i, j
        if best_idx < 0:
            break
        tokens[best_idx : best_idx + 2] = [best_id]
    return [1] + tokens


@pytest.fixture(scope="module")
def tok512(asset):
    return asset("models/stories260K/tok512.bin")


@pytest.fixture(scope="module")
def tok(tok512):
    return load_llama2c_tokenizer(tok512)


@pytest.fixture(scope="module")
def wiki(asset) -> str:
    return asset("data/wikitext2/wiki.test.raw").read_text(encoding="utf-8")[:2000]


def test_special_ids(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    assert tok("").input_ids == [1]


@pytest.mark.parametrize("text", SENTENCES)
def test_matches_llama2c_encode(tok, tok512, text):
    ids = tok(text).input_ids
    assert ids == llama2c_encode(text, *read_tok_bin(tok512))
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_matches_llama2c_on_wikitext(tok, tok512, wiki):
    ids = tok(wiki).input_ids
    assert ids == llama2c_encode(wiki, *read_tok_bin(tok512))
    assert tok.decode(ids, skip_special_tokens=True) == wiki


def test_byte_fallback(tok):
    ids = tok("🙂", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_save_and_reload(tok, tmp_path, wiki):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in SENTENCES + [wiki]:
        assert again(text).input_ids == tok(text).input_ids
    assert again.decode(again(wiki).input_ids, skip_special_tokens=True) == wiki


def test_sentencepiece_model(asset, wiki):
    spm = pytest.importorskip("sentencepiece")
    path = asset("models/llama2-tokenizer/tokenizer.model")
    tok = load_llama2c_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert len(tok) == 32000
    for text in SENTENCES + [wiki]:
        assert tok(text).input_ids == [1] + sp.encode(text)
    assert tok.decode(tok(wiki).input_ids, skip_special_tokens=True) == wiki


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c_tokenizer(tmp_path / "nope.bin")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x07\x00\x00\x00" + b"\xff" * 100)
    with pytest.raises(ValueError, match="junk.bin: not a llama2.c tokenizer"):
        load_llama2c_tokenizer(junk)
    not_sp = tmp_path / "tokenizer.model"
    not_sp.write_bytes(b"hello")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_llama2c_tokenizer(not_sp)
