"""The decode engine (CPU: no CUDA graphs) reproduces transformers' greedy output, dense and GQSA."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from gqsa.engine import Engine, SamplingParams, StaticKVCache
from gqsa.models import load_model
from gqsa.nn import GQSALinear

PROMPTS = ["Once upon a time", "It was a dark and stormy night; the rain fell in torrents", "The"]
N = 16


def hf_greedy(model, ids, n=N):
    """transformers' greedy continuation of each prompt on its own (no padding), EOS not stopping."""
    out = []
    for p in ids:
        g = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


@pytest.fixture(params=["stories260K", "stories260K-gqsa", "gutenberg-22m", "gutenberg-22m-gqsa"])
def model_and_ids(request, stories260k, asset):
    name = request.param
    if name == "stories260K":
        model, tok = load_model(*stories260k)
    elif name == "gutenberg-22m":
        model, tok = load_model(asset("models/gutenberg-llama-22m"))
    else:
        folder = request.getfixturevalue("s260k_folder" if name.startswith("stories") else "g22m_folder")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
        assert any(isinstance(m, GQSALinear) for m in model.modules())
    return model.eval(), [tok(p).input_ids for p in PROMPTS]


def test_engine_greedy_equals_transformers_greedy(model_and_ids):
    model, ids = model_and_ids
    assert len({len(p) for p in ids}) > 1  # the batch is left-padded
    ref = hf_greedy(model, ids)
    eng = Engine(model)
    assert not eng.cuda_graphs
    batch = eng.generate(ids, N)
    assert batch.tokens == ref
    assert batch.decode_steps == N - 1 and batch.batch_size == len(ids)
    assert [eng.generate([p], N).tokens[0] for p in ids] == ref  # batch 1, same engine (session change)


def test_engine_matches_transformers_left_padded_batch(s260k_folder):
    model = AutoModelForCausalLM.from_pretrained(s260k_folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(s260k_folder)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.unk_token or tok.eos_token
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    hf = model.generate(**enc, max_new_tokens=N, do_sample=False, eos_token_id=None)[:, enc.input_ids.shape[1]:]
    assert Engine(model).generate([tok(p).input_ids for p in PROMPTS], N).tokens == hf.tolist()


@pytest.mark.parametrize("compressed", [False, True])
def test_projection_fusion(request, compressed):
    model = request.getfixturevalue("tiny_gqsa" if compressed else "tiny_llama")
    ids = [[1, 5, 9, 3], [7, 2]]
    plain = Engine(model).generate(ids, 10).tokens
    ref = hf_greedy(model, ids, 10)
    with torch.no_grad():
        logits = model(torch.tensor([ids[0]])).logits
    fused = Engine(model, fuse_projections=True)
    assert fused.decoder.fused
    kind = GQSALinear if compressed else torch.nn.Linear
    assert all(type(b.qkv) is kind and type(b.gate_up) is kind for b in fused.decoder.blocks)
    q = model.model.layers[0].self_attn.q_proj
    attr = "qweight" if compressed else "weight"
    base = getattr(fused.decoder.blocks[0].qkv, attr)
    assert getattr(q, attr).untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # a view, no copy
    assert fused.generate(ids, 10).tokens == plain == ref
    with torch.no_grad():  # the model still runs through transformers, unchanged
        torch.testing.assert_close(model(torch.tensor([ids[0]])).logits, logits, rtol=1e-5, atol=1e-5)


def test_eos_stops_a_row_and_pads_it(tiny_llama):
    ids = [[1, 5, 9, 3], [7, 2, 4]]
    eng = Engine(tiny_llama)
    free = eng.generate(ids, 12).tokens
    stop = free[0][4]
    first = free[0].index(stop)
    out = eng.generate(ids, 12, eos_token_id=stop, pad_token_id=0)
    assert out.tokens[0] == free[0][:first + 1]
    cut = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert out.tokens[1] == free[1][:cut]
    # every row finished: the loop stops early once it checks (every sync_every steps)
    eng2 = Engine(tiny_llama, sync_every=1)
    both = eng2.generate([ids[0], ids[0]], 12, eos_token_id=stop)
    assert both.decode_steps < 11 and both.timings["finished_early"]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_llama):
    eng = Engine(tiny_llama)
    ids = [[1, 5, 9, 3], [7, 2]]
    p = SamplingParams(temperature=1.5, top_k=20, top_p=0.9, seed=7)
    a, b = eng.generate(ids, 12, p).tokens, eng.generate(ids, 12, p).tokens
    assert a == b
    assert a != eng.generate(ids, 12, SamplingParams(temperature=1.5, top_k=20, top_p=0.9, seed=8)).tokens
    assert eng.generate(ids, 12, SamplingParams(temperature=2.0, top_k=1, seed=3)).tokens == \
        eng.generate(ids, 12).tokens


def test_bad_requests_are_refused(tiny_llama):
    eng = Engine(tiny_llama)
    with pytest.raises(ValueError, match="at least one token"):
        eng.generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([[1, 96]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([[1]], 0)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        Engine(tiny_llama, cuda_graphs=True)


def test_prefill_runner_repeats_the_generation_prefill(tiny_gqsa):
    """The benchmarks' prefill function computes what ``generate`` does first: the same first token per row
    (left-padded batch), every time it runs; a graphed one needs CUDA graphs; bad prompts are refused."""
    ids = [[1, 5, 9, 3, 11, 40], [7, 2, 4]]
    eng = Engine(tiny_gqsa)
    first = [t[0] for t in eng.generate(ids, 1).tokens]
    run = eng.prefill_runner(ids)
    s = next(iter(eng._sessions.values()))
    for _ in range(2):
        with torch.inference_mode():
            s.out.fill_(-1)
        run()
        assert s.out[:, 0].tolist() == first
        assert s.slot.item() == len(ids[0]) and s.pos[:, 0].tolist() == [6, 3]
    with pytest.raises(ValueError, match="needs an engine with CUDA graphs"):
        eng.prefill_runner(ids, graph=True)
    with pytest.raises(ValueError, match="at least one token"):
        eng.prefill_runner([[1], []])


def test_prefill_graphs_capture_a_repeated_shape_and_replay_it(tiny_gqsa, monkeypatch):
    """The engine's prefill graph bookkeeping, on the CPU with a stand-in for CUDA graphs (a "capture" runs the
    body, a replay runs it again on the graph's own input copies into its output tensor): the first prefill of a shape in a session is
    eager, the second captures it, later ones replay it with the new inputs copied in; a larger prefill than
    PREFILL_GRAPH_TOKENS, another shape or one beyond MAX_PREFILL_GRAPHS of a session is eager; a session's prefill
    graphs share one memory pool; the tokens are the eager engine's."""
    from gqsa.engine import engine as engine_mod

    bodies = []

    class FakeGraph:
        def replay(self):
            self.body()

        def pool(self):
            return "pool"

    calls = []
    real_prefill = Engine._prefill

    def counting_prefill(self, s, tokens, positions):
        calls.append(tokens.shape)
        out = real_prefill(self, s, tokens, positions)
        if in_capture:  # a replay writes the captured output tensor again
            bodies.append(lambda: out.copy_(real_prefill(self, s, tokens, positions)))
            capturing[-1].body = bodies[-1]
        return out

    in_capture = False

    capturing, pools = [], []

    class Capture:
        def __init__(self, graph, pool=None):
            capturing.append(graph)
            pools.append(pool)

        def __enter__(self):
            nonlocal in_capture
            in_capture = True

        def __exit__(self, *exc):
            nonlocal in_capture
            in_capture = False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(Engine, "_prefill", counting_prefill)
    with pytest.raises(ValueError, match="prefill_graphs=True needs CUDA graphs"):
        Engine(tiny_gqsa, prefill_graphs=True)
    ref = Engine(tiny_gqsa, prefill_graphs=False)
    eng = Engine(tiny_gqsa)
    eng.prefill_graphs = True  # (CPU: no CUDA graphs; the stand-ins above)
    a, b = [[1, 5, 9, 3], [7, 2, 4, 8]], [[4, 4, 1, 2], [9, 3, 3, 7]]
    c = [[3, 1, 2]]
    expect = {k: ref.generate(p, 6).tokens for k, p in (("a", a), ("b", b), ("c", c))}
    assert expect["a"] != expect["b"]
    calls.clear()
    assert eng.generate(a, 6).tokens == expect["a"] and len(calls) == 1  # eager
    assert ("prefill", (2, 4)) not in next(iter(eng._sessions.values())).graphs
    assert eng.generate(b, 6).tokens == expect["b"] and len(calls) == 2 and len(bodies) == 1  # captured, replayed
    assert ("prefill", (2, 4)) in next(iter(eng._sessions.values())).graphs
    assert eng.generate(a, 6).tokens == expect["a"] and len(calls) == 2  # replayed with the new inputs copied in
    assert eng.generate(c, 6).tokens == expect["c"] and len(calls) == 3  # a new shape (and session): eager
    # back to batch 2 (a new session): two shapes of one session share the first one's memory pool
    a5 = [p + [6] for p in a]  # (2, 5): the same session as (2, 4)
    for prompts in (a, a5, a, a5, a, a5):
        assert eng.generate(prompts, 6).tokens == ref.generate(prompts, 6).tokens
    assert len(bodies) == 3 and pools == [None, None, "pool"]
    monkeypatch.setattr(engine_mod, "MAX_PREFILL_GRAPHS", 2)  # a third shape in the session: eager from then on
    a6 = [p + [6, 7] for p in a]
    for _ in range(3):
        assert eng.generate(a6, 6).tokens == ref.generate(a6, 6).tokens
    assert len(bodies) == 3
    monkeypatch.setattr(engine_mod, "PREFILL_GRAPH_TOKENS", 7)
    n = len(calls)
    eng.generate(b, 6)
    eng.generate(b, 6)
    assert len(bodies) == 3 and len(calls) == n + 2  # 8 tokens > 7: eager every time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("setting", ["fp16", "w4s50g16"])
def test_prefill_graphs_on_the_gpu_give_the_eager_tokens(setting):
    """On a GPU: generations alternating between prompt shapes of one session (eager, captured, replayed, sharing the
    session's prefill pool) give the tokens of an engine without prefill graphs."""
    from gqsa.bench.synthetic import build_synthetic

    model = build_synthetic("tiny", setting, "cuda", seed=0)
    eager, graphed = Engine(model, prefill_graphs=False), Engine(model)
    assert graphed.prefill_graphs
    gen = torch.Generator().manual_seed(0)
    shapes = [torch.randint(0, 256, (2, n), generator=gen).tolist() for n in (40, 41, 47)]
    want = [eager.generate(p, 8).tokens for p in shapes]
    for _ in range(3):
        assert [graphed.generate(p, 8).tokens for p in shapes] == want
    assert sum(k[0] == "prefill" for k in next(iter(graphed._sessions.values())).graphs) == 3


def test_non_llama_models_are_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="LLaMA-family"):
        Engine(model)


def test_static_kv_cache_writes_in_place():
    c = StaticKVCache(2, 3, 2, 8, 4, torch.float32, "cpu")
    k, v = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)
    ptr = c.k.data_ptr()
    c.write(1, torch.tensor([5, 6]), k, v)
    kc, vc = c.view(1, 7)
    assert torch.equal(kc[:, :, 5:7], k) and torch.equal(vc[:, :, 5:7], v) and c.k.data_ptr() == ptr
    assert kc.shape == (3, 2, 7, 4) and not c.k[0].any()
    assert c.nbytes() == 2 * 2 * 3 * 2 * 8 * 4 * 4
    with pytest.raises(ValueError, match="positive"):
        StaticKVCache(2, 0, 2, 8, 4, torch.float32, "cpu")
