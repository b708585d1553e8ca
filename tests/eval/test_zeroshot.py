"""Zero-shot log-likelihood scoring: batching, tokenization split, metrics, task files, lm-eval."""
from __future__ import annotations

import json
import re

import pytest
import torch

from gqsa.eval import zeroshot as zs


class CharTokenizer:
    """Bytes as tokens (``b % 96``), BOS = 1 first when special tokens are added."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [b % 96 for b in text.encode()]

        class Out:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids

        return Out


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is fastest on a busy machine


def _manual(model, tok, ctx, cont):
    c, t = zs.encode_pair(tok, ctx, cont)
    seq = torch.tensor([c + t])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq[:, :-1]).logits[0].float(), -1)
    pos = torch.arange(len(c) - 1, len(c) + len(t) - 1)
    target = torch.tensor(t)
    return lp[pos, target].sum().item(), bool((lp[pos].argmax(-1) == target).all())


PAIRS = [("Question: a cat\nAnswer:", " sat"), ("The quick brown", " fox jumps over"), ("x", " y"),
         ("A much longer context that goes on and on for a while", " and ends."), ("Hello ", "world")]


def test_batched_loglikelihoods_match_one_at_a_time(tiny_llama):
    tok = CharTokenizer()
    got = zs.loglikelihoods(tiny_llama, tok, PAIRS, batch_size=3)
    for (ctx, cont), (ll, greedy, n) in zip(PAIRS, got):
        want_ll, want_greedy = _manual(tiny_llama, tok, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy and n == len(zs.encode_pair(tok, ctx, cont)[1])


def test_models_without_logits_to_keep_give_the_same_scores(tiny_llama):
    class Plain(torch.nn.Module):  # forward(input_ids, use_cache): no logits_to_keep argument
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.config = m.config

        def forward(self, input_ids, use_cache=False):
            return self.m(input_ids, use_cache=use_cache)

    tok = CharTokenizer()
    a = zs.loglikelihoods(tiny_llama, tok, PAIRS, batch_size=2)
    b = zs.loglikelihoods(Plain(tiny_llama), tok, PAIRS, batch_size=2)
    for x, y in zip(a, b):
        assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1:] == y[1:]


def test_greedy_flag_is_true_for_the_models_own_continuation(tiny_llama):
    tok = CharTokenizer()
    ctx, ids = "abc", tok("abc").input_ids
    with torch.no_grad():
        for _ in range(3):  # greedy decoding of three tokens
            ids = ids + [int(tiny_llama(torch.tensor([ids])).logits[0, -1].argmax())]
    # token t is the byte t (t >= 32) or t + 96 (t < 32): both encode back to t
    own = "".join(chr(t if t >= 32 else t + 96) for t in ids[-3:])
    assert tok(ctx + own).input_ids == ids
    (_, greedy, n), = zs.loglikelihoods(tiny_llama, tok, [(ctx, own)])
    assert greedy and n == 3
    last = ids[-1]
    wrong = own[:-1] + chr(((last + 1) % 96) + (96 if (last + 1) % 96 < 32 else 0))
    (_, greedy, _), = zs.loglikelihoods(tiny_llama, tok, [(ctx, wrong)])
    assert not greedy


def test_long_inputs_are_cut_from_the_left(tiny_llama):
    tok = CharTokenizer()
    pair = ("z" * 300, " end")  # longer than the model's 128 positions
    (ll, _, n), = zs.loglikelihoods(tiny_llama, tok, [pair], max_length=128)
    assert n == 4 and ll < 0


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = CharTokenizer()
    c, t = zs.encode_pair(tok, "Hello ", "world")
    assert c == tok("Hello").input_ids and t == [b % 96 for b in b" world"]


def test_score_task_metrics():
    mc_docs = [{"gold": 1}, {"gold": 0}]
    mc_pairs = [[("q", " aa"), ("q", " bbbbbbbb")], [("q", " a"), ("q", " bb")]]
    # doc 1: raw ll picks choice 0 (wrong), per-char picks choice 1 (right); doc 2: both pick 0 (right)
    lls = [(-2.0, False, 1), (-4.0, False, 1), (-1.0, False, 1), (-5.0, False, 1)]
    r = zs.score_task("mc", mc_docs, mc_pairs, lls)
    assert r == {"n": 2, "acc": 0.5, "acc_norm": 1.0}
    wino = zs.score_task("schema", [{"gold": 1}], [[("a", " c"), ("b", " c")]], [(-3.0, 0, 1), (-1.0, 0, 1)])
    assert wino["acc"] == 1.0 and "acc_norm" not in wino
    lam = zs.score_task("lm", [{}, {}], [[("x", " y")], [("x", " z")]], [(-1.0, True, 1), (-3.0, False, 2)])
    assert lam["acc"] == 0.5 and lam["ppl"] == pytest.approx(2.718281828 ** 2)


def test_requests_follow_the_task_layouts():
    assert zs.requests_for({"query": "Question: q?\n", "choices": ["x", "y"], "gold": 0}, "mc") == [
        ("Question: q?\nAnswer:", " x"), ("Question: q?\nAnswer:", " y")]
    assert zs.requests_for({"context_options": ["A so B", "A so C"], "continuation": "won.", "gold": 0},
                           "schema") == [("A so B", " won."), ("A so C", " won.")]
    assert zs.requests_for({"context": "he said", "continuation": "hi"}, "lm") == [("he said", " hi")]


@pytest.fixture
def tasks_dir(tmp_path):
    rows = {
        "piqa.jsonl": [{"query": f"Question: q{i}\n", "choices": ["a", "bb"], "gold": i % 2} for i in range(7)],
        "arc_challenge.jsonl": [{"query": f"Question: r{i}", "choices": ["a", "b", "c"] + ["d"] * (i % 2),
                                 "gold": 2} for i in range(5)],
        "winogrande.jsonl": [{"context_options": ["x so y", "x so z"], "continuation": "ok.", "gold": 0}] * 4,
        "lambada_openai.jsonl": [{"context": "one two three", "continuation": "four"}] * 3,
    }
    for name, docs in rows.items():
        (tmp_path / name).write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return tmp_path


def test_zeroshot_over_task_files_with_limit(tiny_llama, tasks_dir):
    tok = CharTokenizer()
    r = zs.evaluate_zeroshot(tiny_llama, tok, ["piqa", "arc_c", "winogrande", "lambada"], tasks_dir=tasks_dir, limit=4,
                    progress=False)
    assert set(r["tasks"]) == {"piqa", "arc_challenge", "winogrande", "lambada_openai"}
    assert all(t["n"] == 4 if t["task"] != "lambada_openai" else t["n"] == 3 for t in r["tasks"].values())
    assert all(0.0 <= t["acc"] <= 1.0 for t in r["tasks"].values())
    assert r["tasks"]["winogrande"]["acc"] in (0.0, 1.0)  # the same document four times
    assert r["avg_acc"] == pytest.approx(sum(t["acc"] for t in r["tasks"].values()) / 4)
    assert r["tasks"]["lambada_openai"]["ppl"] > 1


def test_resolve_task(tasks_dir):
    assert zs.resolve_task("arc_c", tasks_dir)[0] == "arc_challenge"
    assert zs.resolve_task(str(tasks_dir / "piqa.jsonl"))[2] == "mc"
    with pytest.raises(ValueError):
        zs.resolve_task("hellaswag_xl", tasks_dir)
    with pytest.raises(FileNotFoundError):
        zs.resolve_task("boolq", tasks_dir)


def test_real_task_files_parse(asset):
    folder = asset("data/zeroshot")
    for name in zs.TASKS:
        _, path, kind = zs.resolve_task(name, folder)
        docs = zs.load_docs(path, limit=5, kind=kind)
        assert len(docs) == 5 and all(zs.requests_for(d, kind) for d in docs)


def test_a_broken_task_file_is_one_error_naming_the_file_and_line(tmp_path):
    """A line that is not JSON was a bare "Expecting value: line 1 column 1" (no file named), a document without
    the task's fields a KeyError inside the scoring, an empty file an average accuracy of nan with exit status 0."""
    bad = tmp_path / "piqa.jsonl"
    cases = [('{"query": "q", "choices": ["a", "b"], "gold": 0}\n\nnot json\n', "line 3: not JSON"),
             ('["a list"]\n', "line 1: not a JSON object"),
             ('{"query": "q", "gold": 0}\n', "line 1: a document of this task needs query, choices; choices missing"),
             ("\n", "no documents in the task file")]
    for text, want in cases:
        bad.write_text(text)
        sep = " " if want.startswith("line") else ": "
        with pytest.raises(ValueError, match="^" + re.escape(f"{bad}{sep}{want}")):
            zs.load_docs(bad, kind="mc")


def test_lm_eval_harness_scores_agree_with_ours(stories260k):
    lm_eval = pytest.importorskip("lm_eval")  # optional dependency: only when installed
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gqsa.models import load_model

    model, tok = load_model(*map(str, stories260k))
    pairs = [("Once upon a time", " there was"), ("The cat sat on the", " mat.")]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    theirs = lm.loglikelihood(reqs)
    ours = zs.loglikelihoods(model, tok, pairs)
    for (a, ga), (b, gb, _) in zip(theirs, ours):
        assert a == pytest.approx(b, abs=1e-3) and bool(ga) == gb
    assert lm_eval is not None
