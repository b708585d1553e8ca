"""The package's one kernel launcher (:mod:`gqsa.kernels.jit`): the interpreter path, what the fast path
specializes on, and programmatic dependent launch (PDL) — off on the CPU, and, compiled for sm_90
offline (no GPU), a ``griddepcontrol.wait`` ahead of every activation load of the kernels that take it."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from gqsa.kernels import gemv_layout, jit  # noqa: E402


def _store_pdl(y_ptr, v, PDL: tl.constexpr):
    tl.store(y_ptr, v + (100 if PDL else 0))


def test_pdl_is_off_on_the_cpu_under_the_interpreter_and_by_request(monkeypatch):
    assert not jit.pdl_enabled("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not jit.pdl_enabled("cuda:0")  # the interpreter: no device code at all
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("GQSA_PDL", "0")
    assert not jit.pdl_enabled("cuda:0") and not jit.pdl_enabled("cuda:0", "ops")


def test_pdl_families_from_the_environment(monkeypatch):
    monkeypatch.delenv("GQSA_PDL", raising=False)
    # by default by the rows a launch serves (batch-1 and batch 9-16 decoding: where it measured gains on the H200)
    assert jit.pdl_policy() == ({"gemv", "gemv2", "gemv2p", "ops", "block", "gemm"}, jit.PDL_DECODE)
    monkeypatch.setenv("GQSA_PDL", "all")
    assert jit.pdl_policy() == (frozenset(jit.PDL_FAMILIES), None)
    monkeypatch.setenv("GQSA_PDL", "none")
    assert jit.pdl_policy() == (frozenset(), None)
    monkeypatch.setenv("GQSA_PDL", " ops, block ")
    assert jit.pdl_policy() == ({"ops", "block"}, None)
    monkeypatch.setenv("GQSA_PDL", "ops,gemv3")
    with pytest.raises(ValueError, match="gemv3"):
        jit.pdl_policy()


def test_pdl_by_default_by_the_rows_a_launch_serves(monkeypatch):
    """The default: the GEMV kernels and the decode-step ops at one row; the ops, block kernels and irregular GEMM
    at 9-16 rows; nothing at 2-8 rows (the hand-written kernel there has no PDL), above 16, or where a launch does not
    say its rows."""
    monkeypatch.delenv("GQSA_PDL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(jit, "_SM90_DEVICES", {0: True})  # as on a GPU of compute capability 9.0
    assert all(jit.pdl_enabled("cuda:0", f, 1) for f in ("gemv", "gemv2", "gemv2p", "ops"))
    assert not jit.pdl_enabled("cuda:0", "gemv2p", 2) and not jit.pdl_enabled("cuda:0", "ops", 4)
    assert not jit.pdl_enabled("cuda:0", "block", 1) and not jit.pdl_enabled("cuda:0", "gemm", 1)
    for rows in (9, 16):
        assert all(jit.pdl_enabled("cuda:0", f, rows) for f in ("ops", "block", "gemm"))
        assert not any(jit.pdl_enabled("cuda:0", f, rows) for f in ("gemv", "gemv2", "gemv2p"))
    for rows in (8, 17, 64, None):
        assert not any(jit.pdl_enabled("cuda:0", f, rows) for f in ("ops", "block", "gemm", "gemv2p"))
    monkeypatch.setenv("GQSA_PDL", "ops")  # an explicit family list: every launch of the family
    assert jit.pdl_enabled("cuda:0", "ops", 4) and not jit.pdl_enabled("cuda:0", "gemv2p", 1)
    monkeypatch.setattr(jit, "_SM90_DEVICES", {0: False})  # compute capability < 9.0: never
    assert not jit.pdl_enabled("cuda:0", "ops", 1)


def test_launch_runs_the_interpreter_and_passes_pdl_false(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y = torch.zeros(1, dtype=torch.int32)
    jit.launch(jit.jitted(_store_pdl), (1,), (y, 7), {}, "cpu", 1, pdl="ops")
    assert y.item() == 7  # PDL requested, but the CPU has none: the kernel was told PDL = False


class _FakeCompiled:
    function = packed_metadata = None

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, fn, meta, lmeta, enter, exit_, *args):
        self.log.append(("fast", (gx, gy, gz), args))


class _FakeKernel:
    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def first(*args, **kw):
            self.log.append(("slow", grid, args, kw))
            return _FakeCompiled(self.log)
        return first


def _stub_gpu(monkeypatch):
    """The compiled CUDA path with the compiler and the stream stubbed: (a fake kernel, a CUDA device)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("GQSA_PDL", raising=False)

    class _Stream:
        def get_current_stream(self, index):
            return 7

    monkeypatch.setattr(triton.runtime.driver, "_active", _Stream())
    monkeypatch.setattr(jit, "_FAST", {})
    return _FakeKernel(), torch.device("cuda", 0)


def test_launch_fast_path_on_a_gpu_caches_per_specialization(monkeypatch):
    """The CUDA path with the compiler stubbed: the first launch of a specialization goes through Triton
    (``kern[grid](...)``, with the constexprs and options as keywords), the next ones call the compiled
    kernel directly with args + constexpr values; a different alignment or int width is a new
    specialization."""
    k, dev = _stub_gpu(monkeypatch)
    a = torch.zeros(64, dtype=torch.float16)
    jit.launch(k, (4,), (a, 16), {"BLOCK": 32}, dev, 4, 2, pdl="ops")
    jit.launch(k, (4,), (a, 16), {"BLOCK": 32}, dev, 4, 2, pdl="ops")
    assert [e[0] for e in k.log] == ["slow", "fast"]
    assert k.log[0][3] == {"BLOCK": 32, "PDL": False, "num_warps": 4, "num_stages": 2}  # default: one-row launches only
    assert k.log[1][1] == (4, 1, 1) and k.log[1][2][:2] == (a, 16) and k.log[1][2][2:] == (32, False)
    jit.launch(k, (4,), (a[1:], 16), {"BLOCK": 32}, dev, 4, 2, pdl="ops")  # not 16-byte aligned
    jit.launch(k, (4,), (a, 2**31), {"BLOCK": 32}, dev, 4, 2, pdl="ops")  # a 64-bit int
    jit.launch(k, (4,), (a, 48), {"BLOCK": 32}, dev, 4, 2, pdl="ops")  # same specialization as 16
    assert [e[0] for e in k.log] == ["slow", "fast", "slow", "slow", "fast"]
    monkeypatch.setenv("GQSA_PDL", "ops")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(jit, "_SM90_DEVICES", {})
    jit.launch(k, (4,), (a, 16), {"BLOCK": 32}, dev, 4, 2, pdl="ops")
    assert k.log[-1][0] == "slow" and k.log[-1][3]["PDL"] is True and k.log[-1][3]["launch_pdl"] is True


def test_rebind_keeps_the_compiled_kernel_of_a_call_site(monkeypatch):
    """A prepared call site (``jit.rebind``, compiler stubbed): the first launch goes through Triton, the next
    ones through the kept Bound (no fast-path lookup any more); a call whose pointers are not aligned as at
    binding takes the checked launch and keeps the Bound it had."""
    k, dev = _stub_gpu(monkeypatch)
    a = torch.zeros(64, dtype=torch.float16)
    b = jit.rebind(None, True, k, (4, 2), (a, 16), {"BLOCK": 32}, dev, 4, 2, pdl="ops")
    assert isinstance(b, jit.Bound) and [e[0] for e in k.log] == ["slow"]
    jit._FAST.clear()  # the Bound does not look the kernel up again
    assert jit.rebind(b, True, k, (4, 2), (a, 48), {"BLOCK": 32}, dev, 4, 2, pdl="ops") is b
    assert k.log[-1] == ("fast", (4, 2, 1), (a, 48, 32, False))
    assert jit.rebind(b, False, k, (4, 2), (a[1:], 16), {"BLOCK": 32}, dev, 4, 2, pdl="ops") is b
    assert k.log[-1][0] == "slow"  # compiled for its own alignment, not run through b
    assert jit.rebind(None, False, k, (4, 2), (a[1:], 16), {"BLOCK": 32}, dev, 4, 2, pdl="ops") is None
    assert jit.aligned16(a, a, None) and not jit.aligned16(a, a, a[1:]) and not jit.aligned16(a[3:], a, None)


def test_spec_bits_tell_apart_what_triton_compiles_apart():
    a = torch.zeros(8, dtype=torch.float16)
    assert jit.spec_bits((a,)) != jit.spec_bits((a[1:],))  # 16-byte aligned or not
    assert jit.spec_bits((16,)) != jit.spec_bits((17,)) != jit.spec_bits((1,))
    assert jit.spec_bits((2**31 - 16,)) != jit.spec_bits((2**31,))  # 32- and 64-bit ints
    assert jit.spec_bits((3,)) == jit.spec_bits((5,))
    assert jit.spec_bits((1.5,)) == jit.spec_bits((2.5,))
    assert jit.spec_bits((a,)) != jit.spec_bits((a.view(torch.int16),))  # dtype of a pointer


def _compile(fn, sig, consts, attrs=None, nw=4):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception:  # pragma: no cover - triton without the compiler API
        pytest.skip("no offline compiler")
    src = ASTSource(fn=triton.jit(fn), signature=sig | {k: "constexpr" for k in consts}, constexprs=consts,
                    attrs=attrs or {})
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw)).asm["ptx"]
    except Exception as e:  # pragma: no cover - no CUDA backend / ptxas here
        pytest.skip(f"offline sm_90 compile unavailable: {e}")


def _lines(ptx, pattern):
    return [i for i, line in enumerate(ptx.split("\n")) if re.search(pattern, line)]


@pytest.mark.parametrize("pipe", [True, False])
def test_v2_gemv_reads_activations_only_after_the_wait(monkeypatch, pipe):
    """The v2 kernels load activations with pure inline asm, which the compiler may move freely: the
    pointer carries the wait's result, so the loads cannot go above it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for pdl in (True, False):
        consts = gemv_layout.kernel_constexprs(G=16, BITS=4, UPT=4, ASM=True, NUM_THREADS=128,
                                               REG=True if pipe else None, PF=2 if pipe else None, PDL=pdl)
        args, types, div16 = gemv_layout.sass_signature(consts, pipe=pipe)
        ptx = _compile(gemv_layout._gemv2p_kernel if pipe else gemv_layout._gemv2_kernel, dict(zip(args, types)),
                       consts, {(i,): [["tt.divisibility", 16]] for i in div16})
        wait, x_loads = _lines(ptx, r"griddepcontrol\.wait"), _lines(ptx, r"ld\.global\.nc\.v4\.u32")
        assert x_loads
        if pdl:
            assert len(wait) == 1 and wait[0] < min(x_loads) and _lines(ptx, r"griddepcontrol\.launch_dependents")
        else:
            assert not wait


def test_block_kernel_waits_before_any_load(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import block_sass
    finally:
        sys.path.pop(0)
    try:
        ptx = block_sass.build(R=64, BM=16, NP=4, nw=4, pdl=True).asm["ptx"]
    except Exception as e:  # pragma: no cover - no CUDA backend / ptxas here
        pytest.skip(f"offline sm_90 compile unavailable: {e}")
    wait = _lines(ptx, r"griddepcontrol\.wait")
    assert len(wait) == 1 and wait[0] < min(_lines(ptx, r"ld\.global|cp\.async"))
