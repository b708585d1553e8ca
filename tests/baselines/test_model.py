"""Whole-model baselines: in place on a tiny LLaMA, and through `gqsa compress --method …` on the
real stories260K (written atomically, loaded back by `gqsa eval`)."""
from __future__ import annotations

import json

import pytest
import torch

from gqsa import checkpoint, cli
from gqsa.baselines import BaselineConfig, compress_model_baseline
from gqsa.nn import GQSALinear


def _tokens(n=8, t=32, vocab=96):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _logit_error(model, ref_logits, tokens):
    with torch.no_grad():
        return (model(tokens).logits - ref_logits).pow(2).mean().item()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_pruning_baselines_make_exact_two_four_models(tiny_llama, method):
    cfg = BaselineConfig(method, pattern="2:4")
    res = compress_model_baseline(tiny_llama, cfg, _tokens(), device="cpu", progress=False)
    assert res.packed is None and res.totals["compressed_layers"] == 14
    for layer in tiny_llama.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj, layer.mlp.up_proj):
            w = lin.weight
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
            assert torch.equal(w, w.half().float())  # fp16 values
    assert res.totals["sparsity"] == 0.5 and res.totals["bits_per_weight"] == 9.0


def test_unstructured_pruning_hits_the_sparsity(tiny_llama):
    res = compress_model_baseline(tiny_llama, BaselineConfig("sparsegpt", pattern="unstructured", sparsity=0.6),
                                  _tokens(), device="cpu", progress=False)
    assert abs(res.totals["sparsity"] - 0.6) < 0.01
    assert res.totals["bits_per_weight"] == pytest.approx(16 * (1 - res.totals["sparsity"]) + 1, abs=0.01)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_model_is_packed_and_closer_than_rtn(tiny_llama, act_order):
    import copy

    tokens = _tokens()
    with torch.no_grad():
        ref = tiny_llama(tokens).logits
    rtn_model = copy.deepcopy(tiny_llama)
    compress_model_baseline(rtn_model, BaselineConfig("rtn", bits=3, group_size=16), device="cpu", progress=False)
    res = compress_model_baseline(tiny_llama, BaselineConfig("gptq", bits=3, group_size=16, act_order=act_order),
                                  tokens, device="cpu", progress=False)
    layers = [m for m in tiny_llama.modules() if isinstance(m, GQSALinear)]
    assert len(layers) == 14 and all(p.sparsity == 0.0 for p in res.packed.values())
    assert res.totals["bits_per_weight"] > 3 + 40 / 16  # codes + scale/zero/index per group, row pointers
    assert _logit_error(tiny_llama, ref, tokens) < _logit_error(rtn_model, ref, tokens)


def test_baseline_config_is_validated():
    with pytest.raises(ValueError):
        BaselineConfig("gptq", bits=5)
    with pytest.raises(ValueError):
        BaselineConfig("wanda", pattern="3:2")
    with pytest.raises(ValueError):
        BaselineConfig("obc")


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 40)
    return path


@pytest.mark.parametrize("method,extra,packed", [("gptq", ["--bits", "4", "--group-size", "32"], True),
                                                 ("sparsegpt", [], False)])
def test_cli_writes_folders_that_load_and_evaluate(stories260k, calib_text, tmp_path, method, extra, packed, capsys):
    model_path, tok_path = map(str, stories260k)
    out = tmp_path / method
    argv = ["compress", model_path, "--method", method, *extra, "--calib", str(calib_text), "--nsamples", "4",
            "--seqlen", "64", "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [method]  # no temporary folder left behind
    rep = json.loads((out / "gqsa_report.json").read_text())
    assert rep["method"] == method and rep["format"] == ("gqsa-packed" if packed else "dense-with-zeros")
    assert rep["files"] and rep["totals"]["model_bytes"] > 0
    assert checkpoint.is_gqsa_folder(out) == packed
    assert cli.main(argv) == 2  # exists, no --overwrite
    if packed:
        model, _ = checkpoint.load(out)
        assert sum(isinstance(m, GQSALinear) for m in model.modules()) == 35
    else:
        from gqsa.models import load_model

        model, _ = load_model(out)
        w = model.model.layers[0].mlp.gate_proj.weight
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    # gqsa eval with perplexity, zero-shot and KL against the uncompressed model
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa.jsonl").write_text(json.dumps({"query": "Question: q\n", "choices": ["a", "b"], "gold": 0}) + "\n")
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--ppl", str(calib_text), "--context", "64", "--max-windows", "2",
                     "--tasks", "piqa", "--tasks-dir", str(tasks), "--kl-reference", model_path,
                     "--tokenizer", tok_path]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "zero-shot average acc" in printed and "KL(reference || model)" in printed
    kinds = [e.get("kind", "ppl") for e in json.loads((out / "gqsa_report.json").read_text())["evaluations"]]
    assert kinds == ["ppl", "zeroshot", "fidelity"]


def test_eval_needs_something_to_do(stories260k, capsys):
    assert cli.main(["eval", str(stories260k[0])]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_two_four_int4_folder_loads_and_its_bits_per_weight_come_from_what_is_stored(stories260k, calib_text, tmp_path):
    from gqsa.baselines.runner import sparse_bits_per_weight
    from gqsa.models import load_model

    model_path, _ = map(str, stories260k)
    out = tmp_path / "sparsegpt-2of4-w4g32"
    assert cli.main(["compress", model_path, "--method", "sparsegpt", "--pattern", "2:4", "--prune-bits", "4",
                     "--group-size", "32", "--calib", str(calib_text), "--nsamples", "4", "--seqlen", "64",
                     "--out", str(out), "--device", "cpu"]) == 0
    rep = json.loads((out / "gqsa_report.json").read_text())
    assert rep["setting"] == "sparsegpt 2:4 + W4 g32" and rep["format"] == "dense-with-zeros"
    model, _ = load_model(out)
    bits = weights = 0
    for layer in model.model.layers:
        for lin in (*[getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
                    *[getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]):
            w = lin.weight.float()
            rows, k = w.shape
            assert bool(((w != 0).reshape(rows, -1, 4).sum(-1) <= 2).all())
            c = -(-k // 32)
            wg = torch.nn.functional.pad(w, (0, c * 32 - k)).reshape(rows, c, 32)
            assert max(len(torch.unique(g)) for g in wg.reshape(-1, 32)) <= 16 + 1  # 4-bit levels + zeros
            # what is stored: n of every m values as 4-bit codes + 2-bit indices, scale/zero per group
            layer_bits = 4 * (rows * k // 2) + 2 * (rows * k // 2) + (16 + 8) * rows * c
            assert layer_bits / (rows * k) == pytest.approx(sparse_bits_per_weight(rows * k // 2, rows, k, (2, 4), 4, 32))
            bits += layer_bits
            weights += rows * k
    assert rep["totals"]["compressed_weights"] == weights
    assert rep["totals"]["bits_per_weight"] == pytest.approx(bits / weights, abs=1e-3)
    assert 3.0 < rep["totals"]["bits_per_weight"] < 4.0


def test_prune_bits_is_for_sparsegpt_only():
    with pytest.raises(ValueError, match="sparsegpt only"):
        BaselineConfig("wanda", prune_bits=4)
    with pytest.raises(ValueError, match="whole 3:5 blocks"):
        BaselineConfig("sparsegpt", pattern="3:5", prune_bits=4, group_size=16)
    assert BaselineConfig("sparsegpt", pattern="4:8", prune_bits=4, group_size=16).setting() == "sparsegpt 4:8 + W4 g16"
