"""benchmarks/prefill.py on the CPU: its FLOP count (the roofline of RESULTS' prefill tables) and its argument errors."""
import importlib.util
from pathlib import Path

import pytest

from gqsa.bench.synthetic import arch_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill.py"


@pytest.fixture(scope="module")
def prefill():
    spec = importlib.util.spec_from_file_location("prefill_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dense_flops_of_a_7b_prefill(prefill):
    cfg = arch_config("llama-2-7b")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o; gate, up, down
    attention = 32 * 2 * 512 * 512 * 4096  # QKᵀ and PV, 2·T²·h each, halved by the causal mask
    head = 2 * 4096 * 32000  # the last position only
    assert prefill.dense_flops(cfg, 1, 512) == 2 * 512 * linear + attention + head
    assert prefill.dense_flops(cfg, 4, 512) == 4 * prefill.dense_flops(cfg, 1, 512)
    gqa = arch_config("llama-2-70b")  # 8 key/value heads of 128: k and v are 1024 wide
    assert prefill.dense_flops(gqa, 1, 1) - prefill.dense_flops(arch_config("llama-2-70b-layers=79"), 1, 1) == \
        2 * (8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 28672) + 2 * 8192


@pytest.mark.parametrize("args, message", [
    (["--settings", "w4s50g16"], "needs fp16 or bf16 as the baseline"),
    (["--settings", "fp16,w9x"], "unknown setting 'w9x'"),
    (["--synthetic", "nope"], "unknown synthetic architecture"),
    (["--rounds", "0"], "must be >= 1"),
    (["--prompt-len", "x"], "comma-separated integers"),
])
def test_bad_arguments_get_one_line(prefill, capsys, args, message):
    assert prefill.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
