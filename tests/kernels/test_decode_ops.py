"""Decode-step kernels (``gqsa.kernels.decode_ops``) against their pure-torch twins, on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, switched on per test by an autouse fixture; the kernels
read it at launch). Small shapes; every output poisoned with NaN first, so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gqsa.kernels import decode_ops as dk  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def rel(a, b):
    a, b = a.float(), b.float()
    assert bool(torch.isfinite(a).all()), "unwritten (NaN) or non-finite output elements"
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def tol(dtype):
    return {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}[dtype]


def test_interpreter_is_available():
    assert dk.available("cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,t", [(4, 2, 1), (3, 3, 1), (4, 1, 3)])
def test_rope_kv_write(dtype, h, hkv, t):
    gen = torch.Generator().manual_seed(h * 10 + hkv + t)
    bsz, d, L = 2, 16, 11
    qkv = torch.randn(bsz, t, (h + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, v = qkv.split((h * d, hkv * d, hkv * d), dim=-1)  # column slices, as the fused projection gives
    ang = torch.rand(bsz, t, d // 2, generator=gen) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    slots = torch.tensor([7, 2, 9][:t])
    kc = torch.full((bsz, hkv, L, d), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    kr, vr = kc.clone(), vc.clone()
    qo = dk.rope_kv_write(q, k, v, cos, sin, kc, vc, slots)
    qr = dk.rope_kv_write_reference(q, k, v, cos, sin, kr, vr, slots)
    assert qo.shape == (bsz, h, t, d) and qo.is_contiguous()
    assert rel(qo, qr) < tol(dtype)
    assert rel(kc[:, :, slots], kr[:, :, slots]) < tol(dtype)
    assert torch.equal(vc[:, :, slots], vr[:, :, slots])  # v is copied, not computed
    other = torch.ones(L, dtype=torch.bool)
    other[slots] = False
    assert bool(kc[:, :, other].isnan().all()) and bool(vc[:, :, other].isnan().all())  # nothing else written
    # the same from cos/sin tables [P, D] read at positions [B, T]
    positions = torch.randint(0, 20, (bsz, t), generator=gen)
    ctab, stab = torch.randn(20, d, generator=gen).to(dtype), torch.randn(20, d, generator=gen).to(dtype)
    kc2, kr2, vc2, vr2 = kc.clone(), kr.clone(), vc.clone(), vr.clone()
    qo = dk.rope_kv_write(q, k, v, ctab, stab, kc2, vc2, slots, positions=positions)
    qr = dk.rope_kv_write_reference(q, k, v, ctab[positions], stab[positions], kr2, vr2, slots)
    assert rel(qo, qr) < tol(dtype) and rel(kc2[:, :, slots], kr2[:, :, slots]) < tol(dtype)


def test_rope_reference_is_transformers_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    bsz, t, h, hkv, d = 2, 3, 4, 2, 8
    q, k, v = (torch.randn(bsz, t, n * d, generator=gen) for n in (h, hkv, hkv))
    cos, sin = torch.randn(bsz, t, d, generator=gen), torch.randn(bsz, t, d, generator=gen)
    kc, vc = torch.zeros(bsz, hkv, 5, d), torch.zeros(bsz, hkv, 5, d)
    slots = torch.tensor([0, 1, 2])
    qo = dk.rope_kv_write(q, k, v, cos, sin, kc, vc, slots)  # float32 through the interpreter
    qt, kt = apply_rotary_pos_emb(q.view(bsz, t, h, d).transpose(1, 2), k.view(bsz, t, hkv, d).transpose(1, 2),
                                  cos, sin)
    torch.testing.assert_close(qo, qt)
    torch.testing.assert_close(kc[:, :, :3], kt)
    torch.testing.assert_close(vc[:, :, :3], v.view(bsz, t, hkv, d).transpose(1, 2))


def _attn_inputs(dtype, bsz, h, hkv, d, L, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, h, 1, d, generator=gen).to(dtype)
    kc = torch.randn(bsz, hkv, L, d, generator=gen).to(dtype)
    vc = torch.randn(bsz, hkv, L, d, generator=gen).to(dtype)
    valid = torch.rand(bsz, L, generator=gen) > 0.3
    return q, kc, vc, valid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,d,kv_len,slot,splits", [
    (4, 2, 16, 13, 11, 1),  # GQA, kv_len not a multiple of the block, slot < kv_len - 1 (later slots unread)
    (3, 3, 16, 13, 12, 1),  # no GQA, 3 heads
    (8, 2, 24, 40, 37, 3),  # GQA 4, D not a power of 2, split-KV with a merge
    (2, 1, 16, 50, 49, 4),  # multi-query, four splits, the last shorter
    (4, 4, 16, 9, 8, 5),  # more splits than the filled slots need: empty splits
])
def test_decode_attention(dtype, h, hkv, d, kv_len, slot, splits):
    bsz, L = 2, 64
    q, kc, vc, valid = _attn_inputs(dtype, bsz, h, hkv, d, L, seed=h + d + splits)
    valid[:, slot] = True  # the current token is always valid
    valid[1, :5] = False  # left padding of a shorter prompt
    kc[:, :, slot + 1:] = float("nan")  # slots past the current one must never be read
    vc[:, :, slot + 1:] = float("nan")
    slots = torch.tensor([slot])
    scale = d ** -0.5
    out = torch.full((bsz, 1, h * d), float("nan"), dtype=dtype)
    o = dk.decode_attention(q, kc, vc, valid, slots, kv_len, scale, splits=splits, out=out)
    assert o.data_ptr() == out.data_ptr()
    ref = dk.decode_attention_reference(q, kc.nan_to_num(), vc.nan_to_num(), valid, slots, kv_len, scale)
    assert rel(o, ref) < tol(dtype)


def test_decode_attention_reference_is_sdpa():
    q, kc, vc, valid = _attn_inputs(torch.float32, 2, 4, 2, 8, 10, seed=3)
    valid[:, 6] = True
    slots = torch.tensor([6])
    ref = dk.decode_attention_reference(q, kc, vc, valid, slots, 8, 0.3)
    k = kc[:, :, :7].repeat_interleave(2, 1)
    v = vc[:, :, :7].repeat_interleave(2, 1)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :7], scale=0.3)
    torch.testing.assert_close(ref, sd.transpose(1, 2).reshape(2, 1, 32))
    out = dk.decode_attention(q, kc, vc, valid, slots, 8, 0.3, splits=2)  # float32 kernel
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_splits_heuristic():
    assert dk.attention_splits(1, 32, 128, sms=132) == 1  # short cache: one kernel, no merge
    assert dk.attention_splits(1, 32, 1024, sms=132) == 8  # chunks of 128 slots
    assert dk.attention_splits(1, 32, 4096, sms=132) == 17  # 4 × 132 programs over 32 kv heads
    assert dk.attention_splits(4, 32, 4096, sms=132) == 3  # 2 × 132 over 128
    assert dk.attention_splits(64, 32, 4096, sms=132) == 1  # the batch fills the GPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hkv,d,kv_len,slot,splits", [
    (4, 2, 16, 13, 11, 1),  # GQA, one program per kv head
    (3, 3, 24, 40, 37, 3),  # no GQA, D not a power of 2, split (the last split holds the slot)
    (8, 1, 16, 50, 20, 4),  # multi-query; the slot in the second of four splits, later splits empty
])
def test_rope_decode_attention(dtype, h, hkv, d, kv_len, slot, splits):
    """RoPE + cache write + attention in one launch = rope_kv_write then decode_attention (twins)."""
    gen = torch.Generator().manual_seed(h + kv_len)
    bsz, L, P = 2, 64, 30
    qkv = torch.randn(bsz, 1, (h + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, v = qkv.split((h * d, hkv * d, hkv * d), dim=-1)
    ctab, stab = torch.randn(P, d, generator=gen).to(dtype), torch.randn(P, d, generator=gen).to(dtype)
    positions = torch.tensor([[7], [29]])
    kc = torch.randn(bsz, hkv, L, d, generator=gen).to(dtype)
    kc[:, :, slot:] = float("nan")  # the current slot is written first; later slots are never read
    vc = kc.clone()
    valid = torch.rand(bsz, L, generator=gen) > 0.3
    valid[:, slot] = True
    slots = torch.tensor([slot])
    kr, vr = kc.clone(), vc.clone()
    out = torch.full((bsz, 1, h * d), float("nan"), dtype=dtype)
    o = dk.rope_decode_attention(q, k, v, ctab, stab, positions, kc, vc, valid, slots, kv_len, d ** -0.5,
                                 splits=splits, out=out)
    assert o.data_ptr() == out.data_ptr()
    qr = dk.rope_kv_write_reference(q, k, v, ctab[positions], stab[positions], kr, vr, slots)
    ref = dk.decode_attention_reference(qr, kr.nan_to_num(), vr.nan_to_num(), valid, slots, kv_len, d ** -0.5)
    assert rel(o, ref) < tol(dtype)
    assert rel(kc[:, :, slot], kr[:, :, slot]) < tol(dtype) and torch.equal(vc[:, :, slot], vr[:, :, slot])
    assert bool(kc[:, :, slot + 1:].isnan().all())  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
def test_add_rms_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(1)
    n = 40  # not a power of 2
    norm = LlamaRMSNorm(n, eps=1e-5)
    norm.weight.data = torch.randn(n, generator=gen)
    norm = norm.to(dtype).requires_grad_(False)
    x, dx = torch.randn(3, 2, n, generator=gen).to(dtype), torch.randn(3, 2, n, generator=gen).to(dtype)
    s, y = dk.add_rms_norm(x, dx, norm.weight, norm.variance_epsilon)
    if dtype == torch.bfloat16:  # the interpreter's float32 -> bf16 cast truncates (the GPU rounds)
        assert rel(s, x + dx) < tol(dtype)
    else:
        assert torch.equal(s, x + dx)
    assert rel(y, norm(x + dx)) < tol(dtype)
    _, yr = dk.add_rms_norm_reference(x, dx, norm.weight, norm.variance_epsilon)
    assert torch.equal(yr, norm(x + dx))
    assert rel(dk.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gen = torch.Generator().manual_seed(2)
    gu = torch.randn(3, 2 * 1500, generator=gen).to(dtype) * 3  # two column blocks, the last partial
    o = dk.silu_mul(gu)
    assert rel(o, dk.silu_mul_reference(gu)) < tol(dtype)
    ref = torch.nn.functional.silu(gu[:, :1500].float()) * gu[:, 1500:].float()
    assert rel(o, ref) < tol(dtype)


def test_cpu_without_interpreter_runs_the_twins(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dk.available("cpu")
    gu = torch.randn(2, 8)
    assert torch.equal(dk.silu_mul(gu), dk.silu_mul_reference(gu))


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_advance(dtype):
    gen = torch.Generator().manual_seed(5)
    bsz, v, max_new = 3, 5000, 6  # V over one block (4096), not a multiple of it
    logits = torch.randn(bsz, v, generator=gen).to(dtype)
    logits[1, 17] = logits[1, 4000] = 50  # a tie: the first index wins
    logits[2, :] = float("-inf")  # all -inf: token 0
    logits[2, 1234] = 3
    state = []
    for fn in (dk.greedy_advance, dk.greedy_advance_reference):
        done = torch.tensor([False, False, True])
        eos = torch.tensor([4000, 17, -1, -1, -1, -1, -1, -1])
        out = torch.full((bsz, max_new), -7)
        tok, pos = torch.zeros(bsz, 1, dtype=torch.long), torch.tensor([[3], [5], [9]])
        counters = torch.tensor([11, 2])
        fn(logits, done, torch.tensor(99), eos, out, tok, pos, counters)
        state.append((done, out, tok, pos, counters))
    for a, b in zip(*state):
        assert torch.equal(a, b)
    assert state[0][1][:, 2].tolist()[1:] == [17, 99] and bool(state[0][0][1])
    assert state[0][4].tolist() == [12, 3]
