"""`gqsa report`: the matrix, its rows' arguments, resuming, and the written table and plot."""
from __future__ import annotations

import json

import pytest

from gqsa import cli
from gqsa import report_matrix as rm


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is fastest on a busy machine


def test_default_matrix():
    rows = {r.name: r for r in rm.default_rows()}
    assert rows["fp16"].is_reference
    for g in (16, 32):
        for s in (30, 50, 70):
            assert f"gqsa-w4s{s}g{g}" in rows
    for name in ("sparsegpt-2of4", "wanda-2of4", "gptq-w2g128", "gptq-w3g128", "rtn-w4g128", "sparsegpt-4of8",
                 "sparsegpt-2of4-w4g128", "sparsegpt-4of8-w4g128", "gqsa-w3s0g128", "gqsa-w4s30g64-rerank4"):
        assert name in rows
    assert rows["sparsegpt-2of4-w4g128"].family == "pruning+quantization"
    assert rm.label(rows["sparsegpt-2of4-w4g128"].options) == rows["sparsegpt-2of4-w4g128"].label
    assert rows["gqsa-w4s50g16"].args == ["--method", "gqsa", "--bits", "4", "--group-size", "16", "--sparsity", "0.5"]
    assert rows["gqsa-w4s50g16"].options == {"method": "gqsa", "bits": 4, "group_size": 16, "sparsity": 0.5}
    for r in rows.values():
        assert rm.label(r.options) == r.label or r.is_reference


def test_with_stage():
    row = rm.default_rows()[1]
    assert rm.with_stage(row, "bqpo").args[-2:] == ["--stages", "bqpo"]
    assert rm.with_stage(row, "bqpo").options["stages"] == "bqpo"
    staged = rm.with_stage(row, "bqpo")
    assert rm.with_stage(staged, "oneshot") == staged  # a row's own --stages wins
    base = next(r for r in rm.default_rows() if r.name == "gptq-w2g128")
    assert rm.with_stage(base, "bqpo") == base  # baselines are never touched


def _fake_row(name, label, family, bits, ppl, kl=0.1):
    return {"name": name, "label": label, "family": family, "bits_per_weight": bits, "model_bytes": 1e6,
            "stage": "oneshot", "ppl": {"ppl": ppl, "windows": 3, "tokens": 999},
            "fidelity": {"kl": kl, "top1_agreement": 0.9},
            "zeroshot": {"avg_acc": 0.5, "tasks": {"piqa": {"acc": 0.5}, "lambada_openai": {"acc": 0.1, "ppl": 9.0}}}}


def _fake_report():
    rows = [_fake_row("fp16", "fp16 (uncompressed)", "reference", 16.0, 10.0, 0.0),
            _fake_row("gqsa-w4s50g16", "GQSA W4 S50% G16", "gqsa", 3.25, 12.0),
            _fake_row("sparsegpt-2of4", "SparseGPT 2:4", "pruning", 9.0, 15.0),
            _fake_row("gptq-w2g128", "GPTQ W2 g128", "quantization", 2.3, 11.0)]
    settings = {"model": "m", "calib": "c", "nsamples": 4, "seqlen": 64, "seed": 0, "eval_text": "t.txt",
                "context": 64, "kl_windows": 2, "tasks": ["piqa", "lambada_openai"], "limit": 5, "dtype": "torch.float32"}
    return {"settings": settings, "command": "gqsa report m", "parameters": 123, "device": "cpu", "rows": rows}


def test_markdown_table_and_headline():
    md = rm.markdown(_fake_report())
    assert "| GQSA W4 S50% G16 | oneshot | 3.25 | 1.0 | 12.00 | 1.200 | 0.1000 | 0.900 | 0.500 |  |" in md
    assert "| GPTQ W2 g128 | oneshot | 2.30 | 1.0 | 11.00 | 1.100 | 0.1000 | 0.900 | 0.500 | ★ |" in md
    assert "- SparseGPT 2:4 (9.00 bits/weight, perplexity 15.00): GQSA is better" in md
    assert "- GPTQ W2 g128 (2.30 bits/weight, perplexity 11.00): GQSA is WORSE" in md
    assert "GQSA W4 S50% G16 (3.25 bits/weight, perplexity 12.00) vs:" in md
    assert "first 5 documents of each" in md and "gqsa report m" in md


def test_pareto_front():
    rows = _fake_report()["rows"]
    assert rm.pareto_front(rows) == {"fp16", "gptq-w2g128"}  # W2 dominates GQSA (fewer bits, lower ppl) and 2:4
    rows.append(_fake_row("tie", "tie", "gqsa", 2.3, 11.0))
    assert rm.pareto_front(rows) == {"fp16", "gptq-w2g128", "tie"}  # equal points do not dominate each other


def test_plot_is_optional(tmp_path):
    made = rm.plot(_fake_report(), tmp_path / "p.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert made is False and not (tmp_path / "p.png").exists()
    else:
        assert made and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_runs_resumes_and_recomputes_only_changed_rows(stories260k, tmp_path, capsys):
    model, tok = map(str, stories260k)
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 30)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa.jsonl").write_text("\n".join(
        json.dumps({"query": f"Question: {q}\n", "choices": ["run", "sleep"], "gold": 0}) for q in "ab") + "\n")
    out = tmp_path / "rep"
    argv = ["report", model, "--tokenizer", tok, "--calib", str(text), "--eval", str(text), "--out", str(out),
            "--rows", "fp16", "gqsa-w4s50g16", "sparsegpt-2of4", "rtn-w4g128", "--context", "64",
            "--max-windows", "3", "--kl-windows", "2", "--nsamples", "4", "--tasks", "piqa", "--tasks-dir",
            str(tasks), "--limit", "2", "--device", "cpu"]
    assert cli.main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == ["fp16", "gqsa-w4s50g16", "sparsegpt-2of4", "rtn-w4g128"]
    assert rows["fp16"]["bits_per_weight"] == 16.0 and rows["fp16"]["fidelity"]["kl"] == 0.0
    assert rows["sparsegpt-2of4"]["bits_per_weight"] == 9.0
    assert rows["gqsa-w4s50g16"]["stage"] in ("oneshot", None) and rows["gqsa-w4s50g16"]["bits_per_weight"] < 5
    for r in rows.values():
        assert r["ppl"]["windows"] == 3 and r["zeroshot"]["tasks"]["piqa"]["n"] == 2
        assert (out / "rows" / f"{r['name']}.json").is_file()
        if r["name"] != "fp16":
            assert r["fidelity"]["kl"] > 0 and r["fidelity"]["windows"] == 2
    assert not any((out / "checkpoints").iterdir())  # compressed folders removed after evaluation
    md = (out / "report.md").read_text()
    assert "| SparseGPT 2:4 |" in md and "GQSA W4 S50% G16 (" in md
    capsys.readouterr()
    # the same command again: every row is kept
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("done before, kept") == 4
    # a different GQSA setting: only the GQSA row runs again
    assert cli.main(argv + ["--gqsa-args", "--quant-init minmax"]) == 0
    log = capsys.readouterr().out
    assert log.count("done before, kept") == 3 and "[gqsa-w4s50g16] GQSA W4 S50% G16: gqsa compress" in log
