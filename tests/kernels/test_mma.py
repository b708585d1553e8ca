"""The hand-written tensor-core kernel's layout (``gqsa.kernels.mma_layout``): every code, scale and zero
point of the canonical layer in the fragment order ``mma_block.cu`` reads, checked on the CPU through the
layout's pure-torch twin (the kernel's data path step by step) against the reference; its dispatch; and,
on a CUDA machine only, the kernel itself against the reference (CI has no GPU: those tests skip).
"""
from __future__ import annotations

import math

import pytest
import torch

from gqsa import format as fmt
from gqsa.kernels import block_layout, dispatch, jit, mma_gemm, mma_layout, reference

from block_layers import make_block_packed  # (same folder, on sys.path under pytest)



def check(y, x, p, bias=None):
    """``y`` against the reference: finite everywhere (outputs are poisoned first), the GEMV tests' tolerance."""
    ref = reference.linear(x.float(), p, None if bias is None else bias.float())
    assert bool(torch.isfinite(y).all()), "unwritten (NaN) output elements"
    err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))
    assert err < 2e-3, f"relative error {err:.2e}"


def make_layer(n, k, g, rows, sparsity=0.5, uneven=False, cluster=False, bits=4, float_zeros=False, seed=0):
    return make_block_packed(n, k, g, bits, sparsity, float_zeros, rows, uneven, seed, cluster, min_keep=0)


def block_of(p):
    r = block_layout.detect_block_rows(p)
    if r is not None:
        return block_layout.build_block_layout(p, r)
    r, row_map = block_layout.detect_row_clusters(p)
    return block_layout.build_block_layout(p, r, row_map=row_map)


CASES = [  # n, k, G, rows, sparsity, uneven, cluster
    (64, 256, 16, 16, 0.5, False, False), (100, 520, 16, 32, 0.5, True, False), (130, 1000, 32, 64, 0.4, False, False),
    (96, 776, 64, 64, 0.3, False, False), (256, 1024, 128, 128, 0.5, True, False), (200, 512, 16, 64, 0.5, False, True),
    (300, 1000, 64, 128, 0.3, False, True), (64, 256, 16, 64, 1.0, False, False), (48, 96, 32, 16, 0.0, False, False),
]


def case_id(c):
    return f"{c[0]}x{c[1]}-G{c[2]}-R{c[3]}-S{c[4]}-u{int(c[5])}-c{int(c[6])}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layout_holds_the_canonical_weights_and_its_twin_matches_the_reference(case):
    n, k, g, rows, sp, uneven, cluster = case
    p = make_layer(n, k, g, rows, sp, uneven, cluster)
    ml = mma_layout.build_mma_layout(block_of(p))
    assert ml.version == mma_layout.MMA_LAYOUT_VERSION and ml.edge == (k % g != 0)
    # every weight, bit for bit
    assert torch.equal(mma_layout.dequantize(ml), reference.dequantize(p, torch.float32))
    # quads: every block's steps fill whole quads; offsets in 4-byte words, inside the row
    assert ml.qw.shape[1:] == (ml.rows // 16, 32, 4) and ml.rows >= rows
    assert int(ml.qptr[-1]) == ml.n_quads and ml.kofs.shape == (ml.n_quads, 4)
    per_block = ml.qptr[1:] - ml.qptr[:-1]  # uniform_quads: the common count, else 0 (the kernel then reads qptr)
    same = bool((per_block == per_block[0]).all()) and int(per_block[0]) > 0
    assert ml.uniform_quads == (int(per_block[0]) if same else 0)
    if not uneven and sp < 1:  # row-balanced block masks: the same quads in every block
        assert ml.uniform_quads > 0
    if ml.n_quads:
        assert int(ml.kofs.min()) >= 0 and 2 * int(ml.kofs.max()) < math.ceil(k / g) * g
    # the twin, step by step, in fp16 and with a bias
    gen = torch.Generator().manual_seed(1)
    for m in (1, 5):
        x = torch.randn(m, k, generator=gen).half()
        bias = torch.randn(n, generator=gen).half() if m == 5 else None
        check(mma_layout.linear(x, ml, bias), x, p, bias)


def test_the_layout_built_in_chunks_is_the_same(monkeypatch):
    """Large layers are repacked a few million codes at a time (bounded temporaries): the same words."""
    for case in (CASES[1], CASES[4], CASES[5]):
        n, k, g, rows, sp, uneven, cluster = case
        bl = block_of(make_layer(n, k, g, rows, sp, uneven, cluster))
        whole = mma_layout.build_mma_layout(bl)
        monkeypatch.setattr(mma_layout, "BUILD_CHUNK", 1)  # 4 slots a chunk
        chunked = mma_layout.build_mma_layout(bl)
        monkeypatch.undo()
        for a in ("qw", "kofs", "sz", "qptr"):
            assert torch.equal(getattr(whole, a), getattr(chunked, a)), a


def test_fragment_order_of_the_words():
    """The nibble order is the contract with the CUDA kernel: nibble j of lane (g, t) is the code at tile row
    g + 8·(j&1), column 2t + 8·((j>>1)&1) + (j>>2), so that (word >> 4j) & 0x000F000F holds the two codes of
    the A-fragment register j of mma.m16n8k16 in its low and high half."""
    n, k, g = 16, 16, 16
    codes = (torch.arange(n)[:, None] * 3 + torch.arange(k)[None, :]) % 16  # code of (row, col)
    s = torch.full((n, 1), 0.5)
    z = torch.zeros(n, 1)
    p = fmt.pack(codes.reshape(n, 1, g).to(torch.uint8), s, z, torch.ones(n, 1, dtype=torch.bool), (n, k), 4, g)
    ml = mma_layout.build_mma_layout(block_layout.build_block_layout(p, 16))
    words = ml.qw[0, 0, :, 0].to(torch.int64) & 0xFFFFFFFF  # step 0, m-tile 0, every lane
    for lane in range(32):
        gg, t = lane // 4, lane % 4
        for reg in range(4):  # a0 (g, 2t..2t+1), a1 (g+8, ...), a2 (g, 2t+8...), a3 (g+8, 2t+8...)
            row = gg + 8 * (reg & 1)
            col = 2 * t + 8 * (reg >> 1)
            pair = (int(words[lane]) >> (4 * reg)) & 0x000F000F
            assert pair & 0xF == codes[row, col] and pair >> 16 == codes[row, col + 1]


def test_scale_words_per_mtile_rows_g_and_g_plus_8():
    p = make_layer(64, 128, 16, 64, 0.0)
    bl = block_layout.build_block_layout(p, 64)
    ml = mma_layout.build_mma_layout(bl)
    # slot 0: the kernel reads sz[slot, warp, g] = (row warp·16 + g, row warp·16 + g + 8)
    for warp in range(4):
        for gg in range(8):
            assert int(ml.sz[0, warp, gg, 0]) == int(bl.sz[0, warp * 16 + gg])
            assert int(ml.sz[0, warp, gg, 1]) == int(bl.sz[0, warp * 16 + gg + 8])


@pytest.mark.parametrize("k,kwargs,why", [(128, dict(bits=2), "2-bit"), (128, dict(bits=8), "8-bit"),
                                          (128, dict(float_zeros=True), "float zero points"),
                                          (202, {}, "202 input features")])
def test_layers_the_kernel_cannot_take_say_why(k, kwargs, why):
    p = make_layer(32, k, 16, 16, **kwargs)
    bl = block_of(p)
    assert why in mma_layout.unsupported(bl)
    with pytest.raises(ValueError, match=why):
        mma_layout.build_mma_layout(bl)


def test_dispatch_without_the_kernel_keeps_the_triton_block_path(monkeypatch):
    """On a machine where the kernel cannot run (here: no CUDA) a block layer never takes the "mma" path,
    whatever the table says, and the table's setting survives its JSON form."""
    assert not mma_gemm.available("cpu")
    table = dispatch.H200_TABLE
    assert table.block.mma_upto(64) > 0 and table.block.mma_upto(16) == 0
    assert dispatch.table_from_json(dispatch.table_to_json(table)).block.mma_max_m == table.block.mma_max_m
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU's kernels: Triton's interpreter
    plan = dispatch.LinearPlan(make_layer(64, 256, 16, 64))
    assert plan.block is not None and not plan.mma_ok
    assert plan.path(4) == "block"


def test_building_a_plan_compiles_nothing_and_a_failed_probe_falls_back_once(monkeypatch):
    """Loading a model builds every layer's plan: the probe compilation of the hand-written kernel waits for the
    first call in its range (was at the first block layer's plan, on every load). Where the probe fails there, the
    layer falls back to the Triton block kernel for good, with the right result; the probe runs once per device."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    probes = []
    monkeypatch.setattr(mma_gemm, "may_run", lambda device: True)
    monkeypatch.setattr(dispatch, "mma_may_run", lambda device: True)
    monkeypatch.setattr(mma_gemm, "_compiles", lambda index: probes.append(index) or False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    p = make_layer(64, 256, 16, 64)
    plan = dispatch.LinearPlan(p)
    assert plan.mma_ok and plan.path(4) == "mma" and probes == []  # the plan says mma; nothing compiled yet
    x = torch.randn(4, 256).half()
    check(plan(x), x, p)  # the first call: the probe fails, the Triton kernel serves
    assert probes == [0] and not plan.mma_ok and plan.path(4) == "block"
    check(plan(x), x, p)
    assert probes == [0]  # (the plan remembers)


def test_the_cuda_source_ships_with_the_package():
    """The kernel is compiled from the installed package's ``mma_block.cu`` (package data in pyproject.toml)."""
    src = mma_gemm._source()
    assert "gqsa_mma_block" in src and "mma.sync.aligned.m16n8k16" in src


def test_launch_arguments_follow_the_kernel_signature(monkeypatch):
    """The launcher's argument list against the parameter list of ``gqsa_mma_block`` in the CUDA source (the
    ABI between them, which no CPU run of the kernel can check), with the compilation stubbed out; an x whose
    rows are not 16-byte aligned is copied before the launch."""
    import re

    params = re.search(r"gqsa_mma_block\(([^)]*)\)", mma_gemm._source()).group(1)
    names = [p.split()[-1].lstrip("*") for p in params.replace("\n", " ").split(",")]
    assert names == ["x", "qw", "kofs1", "sz2", "qptr", "rmap", "bias", "y", "ws", "cnt", "M", "N", "K", "stride_x",
                     "stride_y", "qps", "split", "has_bias", "has_rmap", "ld_ws", "uq"]
    launches = []

    class Kernel:
        def __call__(self, grid, block, args):
            launches.append((grid, block, args))

    specs = []
    monkeypatch.setattr(mma_gemm, "_kernel", lambda *a: specs.append(a) or Kernel())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    p = make_layer(200, 512, 16, 64, cluster=True)
    ml = mma_layout.build_mma_layout(block_of(p))
    call = mma_gemm.MmaCall(ml, mma_gemm.MmaConfig(split_k=2), 5, True, 512, 200, sms=4)
    big = torch.zeros(5, 520, dtype=torch.float16)
    x, bias, y = big[:, 1:513], torch.zeros(200, dtype=torch.float16), torch.empty(5, 200, dtype=torch.float16)
    call(x, bias, y)
    (grid, block, args), = launches
    assert grid == (ml.n_blocks, 2, 1) and block == (32 * ml.rows // 16, 1, 1) and call.split == 2
    got = dict(zip(names, args))
    assert got["x"].data_ptr() % 16 == 0 and torch.equal(got["x"], x) and got["stride_x"] == 512  # the aligned copy
    assert got["qw"] is ml.qw and got["kofs1"] is ml.kofs and got["sz2"] is ml.sz and got["qptr"] is ml.qptr
    assert got["rmap"] is ml.row_map and got["bias"] is bias and got["y"] is y
    assert (got["M"], got["N"], got["K"], got["stride_y"]) == (5, 200, 512, 200)
    assert (got["qps"], got["split"], got["has_bias"], got["has_rmap"]) == (call.qps, 2, 1, 1)
    assert got["ld_ws"] == ml.n_blocks * ml.rows and got["ws"].numel() >= 5 * got["ld_ws"]
    assert got["uq"] == ml.uniform_quads > 0  # (GQSA_UNIFORM=0: 0, the kernel reads qptr)
    # the specialization: (n-tiles, warps, m-tiles per warp, steps per group, edge, device); m-tiles per warp make
    # fewer warps (and are capped at the block's m-tiles)
    assert specs == [(1, ml.rows // 16, 1, 1, False, 0)]
    for m_tiles, m, nt in ((2, 40, 8), (8, 17, 4)):
        call = mma_gemm.MmaCall(ml, mma_gemm.MmaConfig(m_tiles=m_tiles), m, False, 512, 200, sms=4)
        mt = min(m_tiles, ml.rows // 16)
        warps = ml.rows // 16 // mt
        assert specs[-1] == (nt, warps, mt, 1, False, 0) and call.block == (32 * warps, 1, 1)
    monkeypatch.setattr(jit, "UNIFORM", False)
    assert mma_gemm.MmaCall(ml, mma_gemm.MmaConfig(split_k=2), 5, True, 512, 200, sms=4).ints[-1] == 0


def test_launch_rejects_bad_arguments_with_one_line():
    ml = mma_layout.build_mma_layout(block_of(make_layer(64, 256, 16, 64)))
    x, y = torch.zeros(2, 256, dtype=torch.float16), torch.zeros(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 activations, got torch.bfloat16"):
        mma_gemm.launch_mma(x.bfloat16(), ml, None, y.bfloat16())
    with pytest.raises(ValueError, match="y must be"):
        mma_gemm.launch_mma(x, ml, None, y[:, :10])
    with pytest.raises(ValueError, match="x has 128 features"):
        mma_gemm.launch_mma(x[:, :128], ml, None, y)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        mma_gemm.launch_mma(torch.zeros(65, 256, dtype=torch.float16), ml, None, torch.zeros(65, 64,
                                                                                                dtype=torch.float16))


def test_mma_config_and_split():
    with pytest.raises(ValueError):
        mma_gemm.MmaConfig(split_k=-1)
    with pytest.raises(ValueError):
        mma_gemm.MmaConfig(m_tiles=3)
    p = make_layer(128, 1024, 16, 64)
    ml = mma_layout.build_mma_layout(block_of(p))
    # enough CTAs for the waves, each keeping ≥ min_quads quads
    s = mma_gemm.auto_split(ml, mma_gemm.MmaConfig(waves=4.0), sms=132)
    assert 1 <= s <= ml.max_quads // 2
    assert mma_gemm.auto_split(ml, mma_gemm.MmaConfig(split_k=3), sms=132) == 3


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the hand-written kernel needs a CUDA GPU")


def gpu_layer(case):
    """The case's layer (on the CPU, for the reference) and its hand-written-kernel layout on the GPU; skips where
    the kernel does not compile."""
    if not mma_gemm.available("cuda"):
        pytest.skip("the kernel does not compile here")
    n, k, g, rows, sp, uneven, cluster = case
    p = make_layer(n, k, g, rows, sp, uneven, cluster)
    pc = fmt.PackedLinear(**{a: t.cuda() for a, t in p.tensors().items()}, shape=p.shape, bits=4, group_size=g)
    return p, mma_layout.build_mma_layout(block_of(pc))


@cuda
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_the_reference_on_the_gpu(case):  # pragma: no cover - GPU machines only
    p, ml = gpu_layer(case)
    n, k = p.shape
    for m in (1, 3, 8, 9, 16, 32, 33, 47, 64):
        for split, m_tiles in ((0, 1), (1, 1), (3, 1), (0, 2), (3, 4), (1, 8)):  # (m-tiles beyond the block's: all)
            x = torch.randn(m, k, device="cuda").half()
            bias = torch.randn(n, device="cuda").half() if m % 2 else None
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            mma_gemm.launch_mma(x, ml, bias, y, mma_gemm.MmaConfig(split_k=split, m_tiles=m_tiles))
            check(y.cpu(), x.cpu(), p, None if bias is None else bias.cpu())


@cuda
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=case_id)
def test_uniform_blocks_give_the_same_bits_as_read_block_pointers(case, monkeypatch):  # pragma: no cover - GPU only
    """Blocks found at ``b · uniform_quads`` and blocks found through ``qptr``: the same y, bit for bit (split-K 1:
    split-K partial sums are added by atomics in arrival order, not reproducible from one call to the next)."""
    p, ml = gpu_layer(case)
    n, k = p.shape
    assert ml.uniform_quads > 0
    for m in (1, 3, 8, 17):
        x = torch.randn(m, k, device="cuda").half()
        ys = []
        for uniform in (True, False):
            monkeypatch.setattr(jit, "UNIFORM", uniform)
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            mma_gemm.launch_mma(x, ml, None, y, mma_gemm.MmaConfig(split_k=1))
            ys.append(y)
        assert torch.equal(ys[0], ys[1])
        check(ys[0].cpu(), x.cpu(), p)
