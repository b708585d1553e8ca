"""Reader for llama2.c float32 checkpoints, returned as a Hugging Face ``LlamaForCausalLM``.

Two layouts are read (both written by llama2.c's ``export.py``):

* legacy (``--version 0``, e.g. ``stories260K.bin``): a 7 x int32 header ``dim, hidden_dim,
  n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (``vocab_size < 0``: untied classifier), then
  float32 token embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, the
  RoPE tables (``freq_cis`` real and imaginary, ``seq_len * head_dim / 2`` each, skipped) and the
  classifier when untied;
* version 1: a 256-byte header (magic ``"ak42"``, version, the same 7 ints, a tied flag), then the
  norms first, then embedding, wq, wk, wv, wo, w1, w2, w3, classifier when untied.

llama2.c rotates interleaved pairs ``(2i, 2i+1)`` of each head while HF Llama rotates halves
(``rotate_half``), so wq/wk rows are permuted like transformers' ``convert_llama_weights_to_hf.py``.
The file is memory-mapped; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["load_llama2c", "read_llama2c_header", "Llama2cHeader"]

_MAGIC_V1 = 0x616B3432  # "ak42" as a little-endian uint32
_V1_HEADER_BYTES = 256
_LEGACY_HEADER_BYTES = 7 * 4


@dataclass(frozen=True)
class Llama2cHeader:
    """Hyper-parameters of a llama2.c checkpoint, and where its float32 data start."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 = legacy, 1 = float32 with 256-byte header
    data_offset: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every float32 block in file order (``freq_*`` are skipped on load)."""
        d, h, n, v, kv = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        layers = {
            "wq": (n, d, d), "wk": (n, kv, d), "wv": (n, kv, d), "wo": (n, d, d),
            "w1": (n, h, d), "w2": (n, d, h), "w3": (n, h, d),
        }  # fmt: skip
        matrices = [(k, layers[k]) for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
        if self.version == 0:
            half = self.seq_len * self.head_dim // 2
            shapes = [("tok_embeddings", (v, d)), ("attention_norm", (n, d))] + matrices[:4]
            shapes += [("ffn_norm", (n, d))] + matrices[4:] + [("norm", (d,))]
            shapes += [("freq_cis_real", (half,)), ("freq_cis_imag", (half,))]
        else:
            shapes = [("attention_norm", (n, d)), ("ffn_norm", (n, d)), ("norm", (d,))]
            shapes += [("tok_embeddings", (v, d))] + matrices
        if not self.shared_classifier:
            shapes.append(("output", (v, d)))
        return shapes

    def expected_bytes(self) -> int:
        return self.data_offset + 4 * sum(int(np.prod(s)) for _, s in self.tensor_shapes())

    def describe(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
            f"n_kv_heads={self.n_kv_heads}, vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
            f"{'tied' if self.shared_classifier else 'untied'} classifier"
        )


def read_llama2c_header(path: str | Path) -> Llama2cHeader:
    """Parse and check the header of a llama2.c checkpoint (and the file's size against it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a llama2.c float32 checkpoint, or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: llama2.c checkpoint not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_V1_HEADER_BYTES)
    if head[:4] == b"PK\x03\x04":
        raise ValueError(
            f"{path}: is a PyTorch zip/pickle checkpoint, not llama2.c; pickles are not loaded: "
            "pass a model folder with config.json and safetensors weights"
        )
    if len(head) < _LEGACY_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too short for a llama2.c checkpoint")
    magic, version = struct.unpack_from("<Ii", head, 0)
    if magic == _MAGIC_V1:
        if version != 1:
            raise ValueError(
                f"{path}: llama2.c checkpoint version {version} is not supported "
                "(only float32 exports: legacy --version 0, or --version 1)"
            )
        if len(head) < _V1_HEADER_BYTES:
            raise ValueError(f"{path}: truncated llama2.c version-1 header ({size} bytes)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", head, 8)
        shared, offset = bool(head[36]), _V1_HEADER_BYTES
    else:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", head, 0)
        shared, offset, version = vocab > 0, _LEGACY_HEADER_BYTES, 0
        vocab = abs(vocab)
    ints = (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)
    if (
        not all(0 < x < 1 << 24 for x in ints)
        or dim % n_heads
        or n_heads % n_kv
        or (dim // n_heads) % 2
    ):
        raise ValueError(
            f"{path}: not a llama2.c checkpoint (header reads dim, hidden_dim, n_layers, n_heads, "
            f"n_kv_heads, vocab_size, seq_len = {ints})"
        )
    header = Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared, version, offset)
    expected = header.expected_bytes()
    if size != expected:
        raise ValueError(
            f"{path.name}: expected {expected} bytes for a llama2.c checkpoint with {header.describe()}, "
            f"found {size} ({'truncated' if size < expected else 'trailing data'}: wrong format or damaged file)"
        )
    return header


def _rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a projection's output rows from interleaved-pair RoPE to HF's half-split RoPE."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """The ``LlamaConfig`` equivalent to a llama2.c model."""
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        max_position_embeddings=header.seq_len,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def _skip_init():
    """transformers' ``no_init_weights`` when available (the weights are overwritten anyway)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        return contextlib.nullcontext()
    return no_init_weights()


def load_llama2c(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load a llama2.c float32 checkpoint as an eval-mode ``LlamaForCausalLM`` of ``dtype``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a llama2.c checkpoint, or its size does not match its header.
    """
    path = Path(path)
    header = read_llama2c_header(path)
    flat = np.memmap(path, dtype="<f4", mode="r", offset=header.data_offset)
    where: dict[str, tuple[int, tuple[int, ...]]] = {}
    pos = 0
    for name, shape in header.tensor_shapes():
        where[name] = (pos, shape)
        pos += int(np.prod(shape))

    def get(name: str, layer: int | None = None) -> torch.Tensor:
        """One tensor (or one layer's slice of a stacked tensor), copied out of the map."""
        start, shape = where[name]
        if layer is not None:
            shape = shape[1:]
            start += layer * int(np.prod(shape))
        array = np.array(flat[start : start + int(np.prod(shape))]).reshape(shape)
        return torch.from_numpy(array).to(dtype)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": get("tok_embeddings"), "model.norm.weight": get("norm")}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = get("attention_norm", i)
        sd[p + "post_attention_layernorm.weight"] = get("ffn_norm", i)
        sd[p + "self_attn.q_proj.weight"] = _rope_permute(get("wq", i), header.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _rope_permute(get("wk", i), header.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = get("wv", i)
        sd[p + "self_attn.o_proj.weight"] = get("wo", i)
        sd[p + "mlp.gate_proj.weight"] = get("w1", i)
        sd[p + "mlp.down_proj.weight"] = get("w2", i)
        sd[p + "mlp.up_proj.weight"] = get("w3", i)
    shared = header.shared_classifier
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if shared else get("output")
    del flat

    config = llama2c_config(header)
    with _skip_init():
        model = LlamaForCausalLM(config)
    model.load_state_dict(sd, strict=True, assign=True)
    if shared:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2  # llama2.c has no pad token; keeps generate() quiet
    return model.eval()
