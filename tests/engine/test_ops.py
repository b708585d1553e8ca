"""The fusable pointwise functions compute what transformers' LLaMA modules compute."""
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from gqsa.engine import ops


def test_rms_norm_and_residual_add():
    norm = LlamaRMSNorm(32, eps=1e-5)
    norm.weight.data = torch.randn(32)
    for dtype in (torch.float32, torch.bfloat16):
        x, d = torch.randn(2, 3, 32, dtype=dtype), torch.randn(2, 3, 32, dtype=dtype)
        n = norm.to(dtype)
        assert torch.equal(ops.rms_norm(x, n.weight, n.variance_epsilon), n(x))
        s, y = ops.add_rms_norm(x, d, n.weight, n.variance_epsilon)
        assert torch.equal(s, x + d) and torch.equal(y, n(x + d))


def test_rope_and_silu_mul():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    cos, sin = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    for a, b in zip(ops.rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)
    gu = torch.randn(3, 10)
    assert torch.equal(ops.silu_mul(gu), torch.nn.functional.silu(gu[:, :5]) * gu[:, 5:])
