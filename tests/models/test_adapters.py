"""Architecture adapters on tiny random-weight models built locally (no downloads)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from gqsa.models import get_adapter
from gqsa.models.adapters import Adapter

LLAMA_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
OPT_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "opt":
        cfg = tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SMALL)
        return tf.OPTForCausalLM(cfg).eval()
    if kind == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(intermediate_size=128, **SMALL)).eval()
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[kind]
    cfg = config_cls(intermediate_size=128, num_key_value_heads=2, head_dim=16, **SMALL)  # GQA: 4 heads, 2 KV
    return model_cls(cfg).eval()


def execution_order(model: nn.Module, adapter: Adapter) -> list[str]:
    """Names of block 0's adapter linears in the order a forward pass calls them."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, m in adapter.linears(adapter.blocks(model)[0]).items()
    ]
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    for h in handles:
        h.remove()
    return order


def check_groups_in_execution_order(model: nn.Module, adapter: Adapter) -> None:
    order = execution_order(model, adapter)
    assert sorted(order) == sorted(adapter.linear_names)  # each called exactly once
    group_of = {name: g for g, group in enumerate(adapter.linear_groups) for name in group}
    assert [group_of[n] for n in order] == sorted(group_of[n] for n in order)


CASES = [("llama", LLAMA_GROUPS), ("mistral", LLAMA_GROUPS), ("qwen2", LLAMA_GROUPS), ("qwen3", LLAMA_GROUPS)]


@pytest.mark.parametrize("kind, groups", [*CASES, ("opt", OPT_GROUPS)])
def test_registered(kind, groups):
    model = tiny(kind)
    adapter = get_adapter(model)
    assert not adapter.generic and adapter.model_type == kind
    assert adapter.linear_groups == groups
    blocks = adapter.blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    for block in blocks:
        linears = adapter.linears(block)
        assert list(linears) == adapter.linear_names
        assert all(isinstance(m, nn.Linear) for m in linears.values())
        owned = {id(m) for m in block.modules()}
        assert all(id(m) in owned for m in linears.values())
    # GQA: k/v are narrower than q
    if kind != "opt":
        lin = adapter.linears(blocks[0])
        assert lin["self_attn.k_proj"].out_features == lin["self_attn.q_proj"].out_features // 2
    # never embeddings, norms or the head
    listed = {id(m) for b in blocks for m in adapter.linears(b).values()}
    assert id(model.lm_head) not in listed
    assert id(model.get_input_embeddings()) not in listed
    check_groups_in_execution_order(model, adapter)


def test_base_model_and_copy():
    model = tiny("llama")
    adapter = get_adapter(model)
    assert adapter.blocks(model.model) is adapter.blocks(model)  # LlamaModel without the head
    adapter.linear_groups.append(["bogus"])
    assert get_adapter(model).linear_groups == LLAMA_GROUPS  # the registry is not changed
    with pytest.raises(ValueError, match="no linear 'bogus'"):
        adapter.linears(adapter.blocks(model)[0])


def test_generic_fallback():
    model = tiny("gpt_neox")
    with pytest.warns(UserWarning, match="generic"):
        adapter = get_adapter(model)
    assert adapter.generic
    assert adapter.layers_path == "gpt_neox.layers" and len(adapter.blocks(model)) == 2
    names = adapter.linear_names
    assert names == ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
    assert all(len(g) == 1 for g in adapter.linear_groups)
    assert list(adapter.linears(adapter.blocks(model)[1])) == names
    assert "embed_out" not in names
    check_groups_in_execution_order(model, adapter)


def test_unsupported():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3)
            self.stack = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])

    with pytest.raises(ValueError, match="NotADecoder is not a supported decoder-only model"):
        get_adapter(NotADecoder())
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    with pytest.raises(ValueError, match="gpt2 is not a supported decoder-only model"):
        get_adapter(gpt2)  # its projections are Conv1D, not nn.Linear
