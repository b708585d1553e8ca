import json

import pytest
import torch

from gqsa.bench import runner as bench


def test_bench_runs_the_settings_side_by_side_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("GQSA_UNIFORM", "1")
    monkeypatch.delenv("GQSA_PDL", raising=False)
    r = bench.run(["fp16", "w4s50g16"], [1, 2], synthetic="tiny", device="cpu", prompt_len=3, new_tokens=3,
                  repeats=1, log=lambda m: None)
    # the kernel settings a timing depends on travel with it
    assert r["environment"]["gqsa_settings"].get("GQSA_UNIFORM") == "1" and r["environment"]["pdl"] == "decode"
    assert [(x["setting"], x["batch"]) for x in r["rows"]] == [("fp16", 1), ("fp16", 2), ("w4s50g16", 1),
                                                              ("w4s50g16", 2)]
    for x in r["rows"]:
        assert x["decode_tokens_per_s"] > 0 and x["decode_steps"] == 2 and x["compute_dtype"] == "float32"
        assert x["tokens_equal_across_runs"] and len(x["tokens_sha1"]) == 12
    assert r["rows"][0]["speedup_vs_fp16"] == 1.0
    assert bench.tokens_digest([[1, 2]]) == bench.tokens_digest([[1, 2]]) != bench.tokens_digest([[1, 3]])
    assert r["rows"][2]["model_gb"] < r["rows"][0]["model_gb"]
    table = bench.format_table(r)
    assert "w4s50g16" in table and "tokens/s" in table
    path = bench.write_json(r, tmp_path / "b.json")
    assert json.loads(path.read_text())["config"]["synthetic"] == "tiny"


def test_bench_runs_a_model_with_a_quantized_head():
    r = bench.run(["w4s50g16", "w4s50g16h8"], [1], synthetic="tiny", device="cpu", prompt_len=3, new_tokens=2,
                  repeats=1, log=lambda m: None)
    plain, head = r["rows"]  # (the head has no dense weight to compare with the embedding's)
    assert head["decode_tokens_per_s"] > 0 and head["model_gb"] <= plain["model_gb"]


def test_bench_a_checkpoint_folder_as_stored_and_dequantized(s260k_folder):
    r = bench.run(["gqsa", "fp16"], [1], folder=s260k_folder, device="cpu", prompt_len=2, new_tokens=2,
                  repeats=1, log=lambda m: None)
    assert [x["setting"] for x in r["rows"]] == ["gqsa", "fp16"]
    assert r["rows"][0]["model_gb"] < r["rows"][1]["model_gb"]
    with pytest.raises(ValueError, match="'gqsa'"):
        bench.run(["w4s50g16"], [1], folder=s260k_folder, device="cpu")
    with pytest.raises(ValueError, match="not both"):
        bench.run(["fp16"], [1], device="cpu")
    # more positions than the model has (stories260K: 512): refused before any timing (was killed for memory)
    with pytest.raises(ValueError, match=r"^--prompt-len 500 \+ --new-tokens 13 = 513 positions, beyond the model's "
                                         r"context of 512: ask for at most 512 in all$"):
        bench.run(["gqsa"], [1], folder=s260k_folder, device="cpu", prompt_len=500, new_tokens=13, repeats=1,
                  log=lambda m: None)


def test_dense_from_gqsa_matches_logits(s260k_folder):
    import gqsa

    model, tok = gqsa.load(s260k_folder)
    ids = torch.tensor([tok("Once upon a time").input_ids])
    with torch.no_grad():
        a = model(ids).logits
        b = bench.dense_from_gqsa(model, torch.float32)(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_profile_kinds_name_every_gqsa_kernel():
    from gqsa.bench.runner import _kind, _time_by_kind

    for name, kind in [("_gemv_kernel", "gqsa_gemv"), ("_gemv2_kernel", "gqsa_gemv"), ("_gemv2p_kernel", "gqsa_gemv"),
                       ("block_kernel", "gqsa_block"), ("block_dequant_kernel", "gqsa_block_pre"),
                       ("_gemm_kernel", "gqsa_gemm"), ("nvjet_hsh_128x256", "cublas")]:
        assert _kind(name) == kind, name
    assert _time_by_kind([("_gemv2p_kernel", 0.0, 5.0), ("block_kernel", 1.0, 3.0), ("block_kernel", 0.0, 1.0)]) == {
        "gqsa_gemv": 5.0, "gqsa_block": 3.0}
