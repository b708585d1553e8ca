"""One forward step of a LLaMA-family ``*ForCausalLM`` over a :class:`StaticKVCache`.

The step calls the model's own modules (embedding, RMSNorms, rotary embedding, the projections —
``nn.Linear``, :class:`~gqsa.nn.GQSALinear` or any module with that call signature — and
``lm_head``); only attention is the engine's, over the static cache: ``scaled_dot_product_attention``
with a boolean mask of the valid slots. So a GQSA model decodes through ``GQSALinear`` (the fused
GEMV kernel on CUDA for ≤ 4 rows, the dense path for prefill), and the fp16 model through cuBLAS, with
everything else identical.

Options (both off on CPU by default, where the engine must equal transformers' greedy output):

* ``fuse_projections``: q/k/v and gate/up become one linear each (``torch.cat`` of the weights, or of
  the packed BSR tensors: ``row_ptr`` shifted, the rest concatenated), fewer and larger launches. The
  original modules are re-pointed to views of the fused tensors, so no memory is duplicated and the
  model still runs through transformers.
* ``compile_ops``: RMSNorm (+ residual add), RoPE and SiLU·up run as ``torch.compile``d functions
  (:mod:`gqsa.engine.ops`), one kernel each instead of several.
* ``decode_kernels`` (issue 12): the Triton kernels of :mod:`gqsa.kernels.decode_ops` instead (they
  take precedence over ``compile_ops``). Decode step (``T = 1``): RoPE, the KV-cache write and a
  grouped-query attention over the filled cache slots only in **one** launch per layer (cos/sin read
  from tables built once per decoder, rows picked by position: no per-step rotary kernels, no mask
  tensor; split-KV with a merge kernel for long caches); prefill: RoPE + cache write in one launch,
  then SDPA. Residual add + RMSNorm and SiLU·up one launch each. Off by default and on CPU; the
  engine turns it on for CUDA models.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..format import TENSOR_NAMES, PackedLinear
from ..kernels import decode_ops as dk
from ..nn import GQSALinear
from . import ops

ROPE_TABLE_TYPES = ("default", "linear", "llama3")  # rotary types whose cos/sin depend on the position alone
# decode_kernels at T = 1: RoPE + cache write + attention in one kernel (False: rope_kv_write, then the
# attention kernel; for A/B measurements), read when a decoder is made
FUSED_ROPE_ATTENTION = os.environ.get("GQSA_DECODE_UNFUSED_ROPE_ATTENTION", "0").strip() in ("", "0")

SUPPORTED_MODEL_TYPES = ("llama",)


def check_supported(model) -> None:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the decode engine runs LLaMA-family models ({', '.join(SUPPORTED_MODEL_TYPES)}), "
                         f"not model_type '{mt}': use transformers' model.generate for it")
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or any(not hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        raise ValueError(f"{type(model).__name__} does not have the LLaMA module layout "
                         f"(model.embed_tokens/layers/norm/rotary_emb, lm_head)")


def _concat_linear(mods: list[nn.Module]) -> nn.Module | None:
    """One linear computing ``cat([m(x) for m in mods], -1)``; the originals become views of it.
    None when the modules cannot be fused (mixed kinds or settings)."""
    if all(type(m) is nn.Linear for m in mods):
        if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in mods}) != 1:
            return None
        w = torch.cat([m.weight.detach() for m in mods])
        fused = nn.Linear(mods[0].in_features, w.shape[0], bias=mods[0].bias is not None,
                          device="meta", dtype=w.dtype)
        fused.weight = nn.Parameter(w, requires_grad=False)
        if mods[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
        row = 0
        for m in mods:
            n = m.out_features
            m.weight = nn.Parameter(w[row:row + n], requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(fused.bias.data[row:row + n], requires_grad=False)
            row += n
        return fused
    if all(type(m) is GQSALinear for m in mods):
        key = {(m.in_features, m.bits, m.group_size, m.zeros.dtype, m.row_ptr.device, m.bias is None) for m in mods}
        if len(key) != 1:
            return None
        packs = [m.packed for m in mods]
        nnz = [p.nnz for p in packs]
        offsets = [sum(nnz[:i]) for i in range(len(nnz))]
        row_ptr = torch.cat([packs[0].row_ptr[:1]] + [p.row_ptr[1:] + o for p, o in zip(packs, offsets)])
        cat = {t: torch.cat([getattr(p, t) for p in packs]) for t in TENSOR_NAMES if t != "row_ptr"}
        n_total = sum(m.out_features for m in mods)
        bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
        fused = GQSALinear.from_packed(PackedLinear(row_ptr=row_ptr.to(torch.int32), **cat,
                                                    shape=(n_total, mods[0].in_features), bits=mods[0].bits,
                                                    group_size=mods[0].group_size), bias)
        fused.backend = mods[0].backend
        row = 0
        for m, o, k in zip(mods, offsets, nnz):
            for t in cat:
                setattr(m, t, getattr(fused, t)[o:o + k])
            if m.bias is not None:
                m.bias.data = fused.bias.data[row:row + m.out_features]
            row += m.out_features
            m._plan = None
        return fused
    return None


class _Block:
    """The modules of one decoder layer, as the engine calls them."""

    def __init__(self, layer, fuse: bool):
        a, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.o, self.down, self.mlp = a.o_proj, mlp.down_proj, mlp
        self.act = mlp.act_fn
        self.qkv = _concat_linear([a.q_proj, a.k_proj, a.v_proj]) if fuse else None
        self.gate_up = _concat_linear([mlp.gate_proj, mlp.up_proj]) if fuse else None
        self.q, self.k, self.v = a.q_proj, a.k_proj, a.v_proj
        self.gate, self.up = mlp.gate_proj, mlp.up_proj
        self.scaling = a.scaling


class LlamaDecoder:
    """``forward(cache, tokens, positions, slots, kv_len)`` -> logits of each row's last position."""

    def __init__(self, model, fuse_projections: bool = False, compile_ops: bool = False,
                 decode_kernels: bool = False):
        check_supported(model)
        cfg = model.config
        self.model, self.inner = model, model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.blocks = [_Block(layer, fuse_projections) for layer in self.inner.layers]
        self.silu = getattr(cfg, "hidden_act", "silu") == "silu"
        self.compile_ops = compile_ops
        self.decode_kernels = decode_kernels
        self.fused_rope_attention = decode_kernels and FUSED_ROPE_ATTENTION
        self._rope_tables: dict = {}
        self.fused = fuse_projections and all(b.qkv is not None and b.gate_up is not None for b in self.blocks)
        self.sizes_qkv = (self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    # ---------------------------------------------------------------- pieces (eager = transformers' modules)
    def _norm(self, norm, x):
        if self.decode_kernels:
            return dk.rms_norm(x, norm.weight, norm.variance_epsilon)
        if self.compile_ops:
            return ops.compiled("rms_norm")(x, norm.weight, norm.variance_epsilon)
        return norm(x)

    def _rope(self, q, k, cos, sin):
        if self.compile_ops:
            return ops.compiled("rope")(q, k, cos, sin)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)

    def _mlp(self, b: _Block, x):
        if b.gate_up is None:
            return b.mlp(x)
        gu = b.gate_up(x)
        if self.decode_kernels and self.silu:
            return b.down(dk.silu_mul(gu))
        if self.compile_ops and self.silu:
            return b.down(ops.compiled("silu_mul")(gu))
        g, u = gu.split(b.gate.out_features, dim=-1)
        return b.down(b.act(g) * u)

    def _qkv(self, b: _Block, x):
        if b.qkv is None:
            return b.q(x), b.k(x), b.v(x)
        return b.qkv(x).split(self.sizes_qkv, dim=-1)

    def _attention(self, q, k, v, mask, scale):
        """q ``[B, H, T, D]``; k, v ``[B, Hkv, L, D]``; mask bool ``[B, 1, T|1, L]`` (True = attend)."""
        bsz, h, t, d = q.shape
        g = h // self.n_kv
        if t == 1 and g > 1:  # decode with grouped-query attention: the g heads of a group as g queries
            out = F.scaled_dot_product_attention(q.reshape(bsz, self.n_kv, g, d), k, v, attn_mask=mask, scale=scale)
            out = out.reshape(bsz, h, 1, d)
        else:
            if g > 1:
                k = k[:, :, None].expand(-1, -1, g, -1, -1).reshape(bsz, h, k.shape[2], d)
                v = v[:, :, None].expand(-1, -1, g, -1, -1).reshape(bsz, h, v.shape[2], d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(bsz, t, h * d)

    def _add_norm(self, h, delta, weight, eps):
        if self.decode_kernels:
            return dk.add_rms_norm(h, delta, weight, eps)
        return ops.compiled("add_rms_norm")(h, delta, weight, eps)

    def rope_table(self, h: torch.Tensor, length: int):
        """cos/sin ``[P ≥ length, D]`` in ``h``'s dtype from the model's own rotary module (the same values
        as its per-step output: one product per element), made once (outside graph capture) and kept.
        None for rotary types whose values depend on more than the position."""
        rot = self.inner.rotary_emb
        if getattr(rot, "rope_type", "default") not in ROPE_TABLE_TYPES:
            return None
        key = (h.device, h.dtype)
        tab = self._rope_tables.get(key)
        if tab is None or tab[0].shape[0] < length:
            if h.is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            n = max(length, 2 * tab[0].shape[0] if tab is not None else 0)
            cos, sin = rot(h, torch.arange(n, device=h.device)[None])
            tab = self._rope_tables[key] = (cos[0].contiguous(), sin[0].contiguous())
        return tab

    # ---------------------------------------------------------------- the step
    def forward(self, cache, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        """``tokens``/``positions`` ``[B, T]`` go to cache ``slots`` ``[T]``; attention reads the first
        ``kv_len`` slots where ``cache.valid``. Returns logits ``[B, V]`` of position ``T − 1``."""
        bsz, t = tokens.shape
        h = self.inner.embed_tokens(tokens)
        dkern = self.decode_kernels
        table = self.rope_table(h, cache.max_len) if dkern else None
        if table is None:
            cos, sin = self.inner.rotary_emb(h, positions)
        mask = None
        if not (dkern and t == 1):  # the decode attention kernel reads cache.valid itself
            valid = cache.valid[:, None, None, :kv_len]
            if t == 1:
                mask = valid
            else:  # causal over slots; a padded query attends to itself only (never read by a real token)
                idx = torch.arange(kv_len, device=tokens.device)
                mask = (valid & (idx[None, :] <= slots[:, None])) | (idx[None, :] == slots[:, None])
            if tokens.is_cuda:  # one additive mask per step, shared by all layers (not one conversion per layer)
                mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        fused_pointwise = self.compile_ops or dkern
        x = self._norm(self.blocks[0].norm1, h) if self.blocks else h
        for i, b in enumerate(self.blocks):
            q, k, v = self._qkv(b, x)
            if dkern and t == 1 and table is not None and self.fused_rope_attention:  # one launch
                a = dk.rope_decode_attention(q, k, v, *table, positions, cache.k[i], cache.v[i], cache.valid, slots,
                                             kv_len, b.scaling)
            elif dkern:  # RoPE + cache write, one launch; q comes back [B, H, T, D]
                if table is not None:
                    q = dk.rope_kv_write(q, k, v, *table, cache.k[i], cache.v[i], slots, positions=positions)
                else:
                    q = dk.rope_kv_write(q, k, v, cos, sin, cache.k[i], cache.v[i], slots)
                if t == 1:
                    a = dk.decode_attention(q, cache.k[i], cache.v[i], cache.valid, slots, kv_len, b.scaling)
                else:
                    a = self._attention(q, *cache.view(i, kv_len), mask, b.scaling)
            else:
                q = q.view(bsz, t, self.n_heads, self.head_dim).transpose(1, 2)
                k = k.view(bsz, t, self.n_kv, self.head_dim).transpose(1, 2)
                v = v.view(bsz, t, self.n_kv, self.head_dim).transpose(1, 2)
                q, k = self._rope(q, k, cos, sin)
                cache.write(i, slots, k, v)
                a = self._attention(q, *cache.view(i, kv_len), mask, b.scaling)
            o = b.o(a)
            if fused_pointwise:
                h, x = self._add_norm(h, o, b.norm2.weight, b.norm2.variance_epsilon)
                h, x = self._add_norm(h, self._mlp(b, x), *self._next_norm(i))
            else:
                h = h + o
                h = h + self._mlp(b, b.norm2(h))
                x = self.blocks[i + 1].norm1(h) if i + 1 < len(self.blocks) else None
        x = x[:, -1:] if fused_pointwise else self.inner.norm(h[:, -1:])  # (fused: final norm done above)
        return self.model.lm_head(x)[:, 0]

    def _next_norm(self, i: int):
        norm = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.inner.norm
        return norm.weight, norm.variance_epsilon
