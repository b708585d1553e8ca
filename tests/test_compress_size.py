"""A compressed folder is never larger than its source: dense tensors (embedding, norms) keep the dtype the
source checkpoint stores them in (gutenberg-llama-22m is float16; it is loaded and compressed in float32)."""
import json

import pytest
from safetensors import safe_open

from gqsa.cli import main


@pytest.mark.slow
def test_gutenberg_w4s50g16_is_under_0_7_of_the_fp16_source(asset, tmp_path):
    src = asset("models/gutenberg-llama-22m")
    out = tmp_path / "g22m-w4s50g16"
    assert main(["compress", str(src), "--calib", str(asset("data/gutenberg/calib.txt")), "--nsamples", "4",
                 "--seqlen", "64", "--bits", "4", "--sparsity", "0.5", "--group-size", "16", "--stages", "oneshot",
                 "--threads", "1", "--out", str(out)]) == 0
    source = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert written < 0.7 * source, (written, source)
    packed = {f"{n}.{t}" for n in json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
              for t in ("row_ptr", "col_idx", "qweight", "scales", "zeros")}
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        dense = {h.get_slice(k).get_dtype() for k in h.keys() if k not in packed}
    assert dense == {"F16"}
    assert json.loads((out / "gqsa_report.json").read_text())["dense_dtype"] == "torch.float16"
    print(f"\nsafetensors: {written:,} bytes = {written / source:.3f} x the fp16 source ({source:,} bytes)")
