"""Tokenizers for llama2.c models: the ``tokenizer.bin`` format and SentencePiece ``.model`` files.

Both become a ``transformers`` fast tokenizer (a ``tokenizers`` BPE model with byte fallback), so a
compressed checkpoint can carry it with ``save_pretrained`` and get it back with
``AutoTokenizer.from_pretrained``.

The result encodes exactly like llama2.c's ``encode`` (and SentencePiece's BPE):

* a dummy space is prepended to non-empty text, and every space is a ``"▁"`` inside the model
  (llama2.c's file stores pieces with plain spaces; they are mapped back to ``"▁"`` here);
* the text is not split into words: BPE runs over the whole string, merging at each step the
  adjacent pair whose merged piece has the highest score (merges are ranked by that score);
* characters missing from the vocabulary fall back to their UTF-8 bytes, ``<0xXX>`` at ids 3..258;
* ``<unk>`` = 0, ``<s>`` = 1 (added in front of every encoded text), ``</s>`` = 2.

It is built with a ``Prepend`` + ``Replace`` normalizer rather than transformers' ``LlamaTokenizer``
(``Metaspace`` pre-tokenizer), because the latter does not add the dummy space to text that already
starts with a space, whereas llama2.c and SentencePiece do.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["load_llama2c_tokenizer", "read_llama2c_tokenizer", "build_bpe_tokenizer"]

SPACE = "▁"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_N_SPECIAL = 3  # <unk>, <s>, </s> come first; the 256 byte tokens follow at ids 3..258


def _byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


def read_llama2c_tokenizer(path: str | Path) -> tuple[list[str], list[float]]:
    """Read a llama2.c ``tokenizer.bin``: returns (pieces, scores), pieces with ``"▁"`` for space.

    Format: int32 ``max_token_length``, then per token float32 score, int32 byte length, UTF-8 bytes.
    Ids 1 and 2 (stored as ``"\\n<s>\\n"`` and ``"\\n</s>\\n"`` by llama2.c's exporter) are renamed to
    ``<s>`` and ``</s>``.

    Raises:
        ValueError: the file is not in this format.
    """
    path = Path(path)
    data = path.read_bytes()
    name = path.name

    def bad(why: str) -> ValueError:
        return ValueError(f"{name}: not a llama2.c tokenizer file ({why}); pass a tok*.bin or tokenizer.model")

    if len(data) < 4:
        raise bad(f"only {len(data)} bytes")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len < 1 << 16:
        raise bad(f"max_token_length={max_len}")
    pieces: list[str] = []
    scores: list[float] = []
    off = 4
    while off < len(data):
        if off + 8 > len(data):
            raise bad(f"truncated after token {len(pieces)}")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if not 0 <= n <= max_len or off + n > len(data):
            raise bad(f"token {len(pieces)} has length {n}")
        try:
            piece = data[off : off + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"token {len(pieces)} is not UTF-8") from e
        off += n
        pieces.append(piece.replace(" ", SPACE))
        scores.append(score)
    if len(pieces) < _N_SPECIAL + 256 or pieces[_N_SPECIAL + 255] != _byte_piece(255):
        raise bad("byte-fallback tokens <0x00>..<0xFF> not at ids 3..258")
    pieces[0], pieces[1], pieces[2] = UNK, BOS, EOS
    return pieces, scores


def _merges(pieces: Sequence[str], scores: Sequence[float], mergeable: set[str]) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece-style vocabulary: every split of a piece into two pieces.

    Ranked by the merged piece's score (highest first), which is how llama2.c and SentencePiece
    choose the next merge; ties between pairs making the same piece by the pieces' ids.
    """
    ids = {p: i for i, p in enumerate(pieces)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, score in zip(pieces, scores):
        if piece not in mergeable:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                found.append((-score, ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_bpe_tokenizer(
    pieces: Sequence[str],
    scores: Sequence[float],
    special_ids: Sequence[int] = (0, 1, 2),
    byte_ids: Sequence[int] = range(_N_SPECIAL, _N_SPECIAL + 256),
    unused_ids: Sequence[int] = (),
) -> PreTrainedTokenizerFast:
    """Build a llama2.c/SentencePiece-compatible fast BPE tokenizer from pieces and scores.

    Args:
        pieces: the vocabulary, id order, ``"▁"`` for space; ``<unk>``, ``<s>``, ``</s>`` among them.
        scores: one score per piece; a higher score merges first.
        special_ids: ids of control tokens (never produced from text by BPE).
        byte_ids: ids of the ``<0xXX>`` byte-fallback tokens.
        unused_ids: ids of pieces that BPE must not produce.
    """
    if len(set(pieces)) != len(pieces):
        raise ValueError("tokenizer vocabulary has duplicate pieces")
    vocab = {p: i for i, p in enumerate(pieces)}
    excluded = set(special_ids) | set(byte_ids) | set(unused_ids)
    mergeable = {p for i, p in enumerate(pieces) if i not in excluded}
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(pieces, scores, mergeable),
            unk_token=UNK,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special_ids])
    bos_id = vocab[BOS]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # literal "<s>" in text is text, as in llama2.c and SentencePiece
    )


def _load_sentencepiece(path: Path) -> PreTrainedTokenizerFast:
    """Convert a LLaMA-style SentencePiece BPE ``.model`` with the sentencepiece library.

    Checked against SentencePiece itself on a probe text: a model that does not encode like
    LLaMA's (unigram, text normalization, no byte fallback) raises ``ValueError``.
    """
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path.name}: not a SentencePiece model ({e})") from e
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    byte = [i for i in range(n) if sp.is_byte(i)]
    unused = [i for i in range(n) if sp.is_unused(i)]
    if pieces[:3] != [UNK, BOS, EOS] or len(byte) != 256:
        raise ValueError(
            f"{path.name}: unsupported SentencePiece model (need <unk>, <s>, </s> at ids 0..2 and byte fallback)"
        )
    tok = build_bpe_tokenizer(pieces, scores, special, byte, unused)
    probe = "Hello world,  it's 2024!\nNaïve café: ünïcödé ✓ 🙂\t x  "
    if tok(probe, add_special_tokens=False).input_ids != sp.encode(probe):
        raise ValueError(f"{path.name}: SentencePiece model does not encode like LLaMA's BPE; it is not supported")
    return tok


def load_llama2c_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a llama2.c ``tok*.bin`` / ``tokenizer.bin``, or a SentencePiece ``tokenizer.model``.

    Returns a fast tokenizer whose ``tok(text).input_ids`` starts with BOS (1) and equals
    llama2.c's ``encode(text, bos=1, eos=0)``; ``decode(ids, skip_special_tokens=True)``
    gives the text back.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is in neither format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    if path.suffix == ".model":
        return _load_sentencepiece(path)
    return build_bpe_tokenizer(*read_llama2c_tokenizer(path))
