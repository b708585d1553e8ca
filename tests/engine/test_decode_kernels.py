"""The engine with the decode-step kernels (``decode_kernels=True``: RoPE + KV write, decode attention,
add+RMSNorm, SiLU·up from :mod:`gqsa.kernels.decode_ops`), on the CPU through Triton's interpreter:
the same greedy tokens as transformers and as the plain engine, batched (left-padded) and single,
dense and GQSA, fused projections or not. Tiny models (the interpreter runs every program in Python)."""
import pytest
import torch

pytest.importorskip("triton")

from gqsa.engine import Engine  # noqa: E402
from gqsa.kernels import decode_ops as dk  # noqa: E402


def hf_greedy(model, ids, n):
    """transformers' greedy continuation of each prompt on its own (no padding), EOS not stopping."""
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in ids]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def test_auto_is_off_on_cpu(tiny_llama):
    assert not Engine(tiny_llama).decoder.decode_kernels


@pytest.mark.parametrize("compressed,fuse", [(False, True), (True, True), (False, False)])
def test_engine_with_decode_kernels_equals_transformers(request, compressed, fuse, monkeypatch):
    model = request.getfixturevalue("tiny_gqsa" if compressed else "tiny_llama")
    calls = {}
    for name in ("rope_kv_write", "rope_decode_attention", "add_rms_norm", "silu_mul"):  # count the kernel entries
        fn = getattr(dk, name)

        def wrapped(*a, _fn=fn, _n=name, **k):
            calls[_n] = calls.get(_n, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(dk, name, wrapped)
    ids = [[1, 5, 9, 3], [7, 2]]
    n = 8
    ref = hf_greedy(model, ids, n)
    eng = Engine(model, decode_kernels=True, fuse_projections=fuse)
    assert eng.decoder.decode_kernels and not eng.cuda_graphs
    assert eng.generate(ids, n).tokens == ref  # left-padded batch
    assert eng.generate([ids[1]], n).tokens == [ref[1]]  # batch 1
    layers = len(model.model.layers)
    steps = 2 * n  # prefill + n - 1 decode steps, two generations
    assert calls["rope_kv_write"] == layers * 2  # prefills (then SDPA)
    assert calls["rope_decode_attention"] == layers * (steps - 2)  # decode steps: RoPE + write + attention
    assert calls["add_rms_norm"] == 2 * layers * steps + steps  # 2 per layer + the first norm (delta=None)
    assert calls.get("silu_mul", 0) == (layers * steps if fuse else 0)


@pytest.mark.parametrize("fused", [True, False])
def test_decoder_logits_match_plain_engine(tiny_llama, fused):
    """One prefill + decode steps: logits of the kernel path within float32 rounding of the plain path
    (decode: RoPE + write + attention fused, or rope_kv_write then decode_attention)."""
    from gqsa.engine import LlamaDecoder, StaticKVCache

    torch.manual_seed(1)
    outs = []
    for kern in (False, True):
        dec = LlamaDecoder(tiny_llama, fuse_projections=True, compile_ops=False, decode_kernels=kern)
        dec.fused_rope_attention = kern and fused
        cache = StaticKVCache(dec.n_layers, 2, dec.n_kv, 64, dec.head_dim, torch.float32, "cpu")
        toks = torch.tensor([[0, 5, 9, 3, 8], [7, 2, 4, 1, 6]])
        cache.valid[:, :5] = True
        cache.valid[0, 0] = False  # left pad
        pos = torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
        res = []
        with torch.inference_mode():
            res.append(dec.forward(cache, toks, pos, torch.arange(5), 5))
            for i in range(3):  # decode at slots 5, 6, 7 with kv_len 37 (not a multiple of anything)
                cache.valid[:, 5 + i] = True
                res.append(dec.forward(cache, torch.tensor([[3 + i], [4 + i]]), pos[:, -1:] + 1 + i,
                                       torch.tensor([5 + i]), 37))
        outs.append(torch.stack(res))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
