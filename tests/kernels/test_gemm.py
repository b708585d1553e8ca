"""Tensor-core GQSA GEMM (``gqsa.kernels.gemm``), its load-time layout (``gqsa.kernels.layout``) and the
batch-size dispatch (``gqsa.kernels.dispatch``) against the pure-torch reference, on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, switched on per test by an autouse fixture).

Shapes are small (the interpreter runs every program in Python); outputs are poisoned with NaN before
every launch, so an unwritten element fails. The tolerances are those of ``test_gemv.py``.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gqsa.kernels import dispatch, gemm, gemv, reference  # noqa: E402
from gqsa.kernels.layout import build_tile_layout, to_packed  # noqa: E402

from test_gemv import _skip_unless_no_backend, check, make_packed  # noqa: E402  (same folder, on sys.path)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def launch(x, p, cfg, bias=None, layout=None):
    layout = layout or build_tile_layout(p)
    y = torch.full((x.shape[0], p.shape[0]), float("nan"), dtype=x.dtype)
    out = gemm.launch_gemm(x, layout, bias, y, cfg)
    assert out.data_ptr() == y.data_ptr()
    return y


# n, k, G, bits, sparsity, float zeros, special, M, dtype, bias, config (block_m, block_n, split_k)
CASES = [
    (37, 200, 16, 4, 0.5, False, None, 2, torch.float16, False, (16, 16, 0, True)),  # K % G != 0, M = 2
    (29, 256, 32, 4, 0.3, True, None, 16, torch.bfloat16, True, (16, 32, 2, False)),  # float zeros, split-K
    (40, 300, 64, 4, 0.6, False, "empty_rows", 17, torch.float16, True, (32, 32, 3, True)),  # M bucket 17–32
    (9, 500, 128, 4, 0.2, False, None, 40, torch.float16, False, (64, 16, 0, False)),  # M bucket 33–64
    (23, 160, 16, 4, 0.0, False, "one_row", 3, torch.float16, True, (16, 16, 2, True)),  # very uneven rows
    (17, 96, 16, 4, 0.5, False, "empty", 5, torch.float16, True, (16, 16, 2, False)),  # no kept group at all
    (31, 256, 16, 2, 0.5, False, None, 4, torch.float16, False, (16, 32, 0, True)),
    (19, 200, 32, 2, 0.4, True, None, 8, torch.bfloat16, False, (16, 16, 2, False)),
    (25, 160, 16, 8, 0.5, False, None, 6, torch.bfloat16, True, (16, 16, 0, True)),
    (13, 300, 128, 8, 0.5, True, None, 70, torch.float16, False, (128, 16, 0, False)),  # M bucket > 64
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-G{c[2]}-b{c[3]}-S{c[4]}-fz{int(c[5])}-"
                                                       f"{c[6]}-M{c[7]}-{str(c[8])[6:]}-cfg{c[10]}")
def test_gemm_matches_reference(case):
    n, k, g, bits, sp, fz, special, m, dtype, has_bias, (bm, bn, split, halves) = case
    p = make_packed(n, k, g, bits, sp, fz, special)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    cfg = gemm.GemmConfig(block_m=bm, block_n=bn, split_k=split, halves=halves)
    check(launch(x, p, cfg, bias), x, p, bias)
    if split:  # the split-K workspace must come back clean for the next launch (and the next layer)
        ws = gemm.workspace(torch.device("cpu"))
        assert not bool(ws.partial.any()) and not bool(ws.counters.any())
        check(launch(x, p, cfg, bias), x, p, bias)


@pytest.mark.parametrize("case", CASES[::2] + CASES[1::2][:3], ids=lambda c: f"G{c[2]}-b{c[3]}-{c[6]}-M{c[7]}-"
                                                                             f"{str(c[8])[6:]}")
def test_gemm_canonical_view_matches_reference(case):
    """Layout version 3: the GEMM over the layer's own tensors (no copy: the same qweight storage), both column-set
    splits, against the reference; the view gives the canonical tensors back and holds only its index."""
    n, k, g, bits, sp, fz, special, m, dtype, has_bias, (bm, bn, split, halves) = case
    p = make_packed(n, k, g, bits, sp, fz, special)
    lay = build_tile_layout(p, canonical=True)
    assert lay.canonical and lay.version == 3 and lay.qweight.data_ptr() == p.qweight.data_ptr()
    assert lay.nbytes() == 4 * (lay.meta.numel() + lay.kt_start.numel() + lay.row_base.numel())
    q = to_packed(lay)
    for name in ("row_ptr", "col_idx", "qweight", "scales", "zeros"):
        assert torch.equal(getattr(q, name), getattr(p, name)), name
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    for hv in (False, True):
        check(launch(x, p, gemm.GemmConfig(block_m=bm, block_n=bn, split_k=split, halves=hv), bias, layout=lay),
              x, p, bias)


def test_fp16_dequant_paths_agree():
    """``deq16`` (fp16 arithmetic) and the float32 path give the same dense tile, hence the same y."""
    p = make_packed(33, 256, 16, 4, 0.5)
    x = torch.randn(5, 256).half()
    y16 = launch(x, p, gemm.GemmConfig(16, 32, deq16=True))
    y32 = launch(x, p, gemm.GemmConfig(16, 32, deq16=False))
    check(y16, x, p)
    assert torch.equal(y16, y32)


@pytest.mark.parametrize("g,bits,fz,special", [(16, 4, False, None), (32, 2, True, "empty_rows"),
                                               (128, 8, False, "one_row"), (64, 4, False, "empty")])
def test_layout_round_trip(g, bits, fz, special):
    p = make_packed(45, 700, g, bits, 0.5, fz, special)
    lay = build_tile_layout(p)
    assert lay.groups_per_ktile == 128 // g and lay.n_pad % 16 == 0
    assert int(lay.kt_start[-1]) == p.nnz
    q = to_packed(lay)
    for name in ("row_ptr", "col_idx", "qweight", "scales", "zeros"):
        assert torch.equal(getattr(q, name), getattr(p, name)), name
    assert lay.nbytes() < p.nbytes() + lay.meta.numel() * 4 + 4 * (lay.n_ktiles + 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_codes_in_plane_order(bits):
    """Layout version 2: field j of byte i of a group holds feature j·B + i (B = G·bits/8 bytes per group),
    and sz packs the scale and zero point bits; the canonical packing holds feature (8/bits)·i + j there."""
    from gqsa import quant

    g = 32
    p = make_packed(20, 256, g, bits, 0.4)
    lay = build_tile_layout(p)
    assert lay.version == 2
    cpb, nb = 8 // bits, g * bits // 8
    canon = to_packed(lay)  # canonical order again, checked equal in test_layout_round_trip
    codes = quant.unpack_codes(canon.qweight, bits, g).to(torch.int32)  # [nnz, G] per canonical group
    stored = lay.qweight.to(torch.int32)  # [nnz, B] per layout group
    # the layout's group order: match each layout group to its canonical group through the (scale, zero) pair
    # is ambiguous; use build_tile_layout's permutation instead (k-tile-major, then row, then column)
    rows = torch.repeat_interleave(torch.arange(20), (p.row_ptr[1:] - p.row_ptr[:-1]).long())
    col = p.col_idx.long()
    perm = torch.argsort(((col // (128 // g)) * lay.n_pad + rows) * (128 // g) + col % (128 // g), stable=True)
    for j in range(cpb):
        field = (stored >> (j * bits)) & ((1 << bits) - 1)  # [nnz, B]
        assert torch.equal(field, codes[perm][:, j * nb:(j + 1) * nb]), j
    s16 = (lay.sz & 0xFFFF).to(torch.int16).view(torch.float16)
    assert torch.equal(s16, p.scales[perm]) and torch.equal(((lay.sz >> 16) & 0xFF).to(torch.uint8), p.zeros[perm])


def test_layout_rejects_bad_block_k():
    p = make_packed(8, 64, 16)
    with pytest.raises(ValueError, match="block_k"):
        build_tile_layout(p, block_k=200)
    with pytest.raises(ValueError, match="block_k"):
        build_tile_layout(p, block_k=256)  # 16 groups: more than the one-byte mask holds


def test_compiled_only_knobs_run_in_the_interpreter():
    """``asm``, ``prefetch`` and ``maxnreg`` change the compiled kernel only: the interpreter ignores them and gives
    the same y as without them."""
    p = make_packed(40, 384, 16, 4, 0.5)
    x = torch.randn(5, 384).half()
    y0 = launch(x, p, gemm.GemmConfig(16, 32, asm=False))
    y1 = launch(x, p, gemm.GemmConfig(16, 32, prefetch=True, maxnreg=128))
    check(y0, x, p)
    assert torch.equal(y0, y1)


def test_gemm_compiles_offline_with_its_position_helper(monkeypatch):
    """Compiled (sm_90, offline: no GPU) the kernel builds with its jitted helpers, the position helper inlined at
    both places positions are made (the prologue and the loop: two ``popc``), one L2 prefetch (PF) and the inline-PTX
    dequantization of both nibble planes; without ASM, none of them; with HALVES each of them once per column set;
    the canonical view (CANON) as the plane-order kernel.
    (The interpreter runs the helpers as plain functions, so the tests above never compile them.)"""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception:  # pragma: no cover - triton without the compiler API
        pytest.skip("no offline compiler")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for asm, halves, canon in ((True, False, False), (False, False, False), (True, True, False), (True, False, True)):
        consts = dict(G=16, BITS=4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, TILES=0, SPLIT=True, HAS_BIAS=False,
                      EVEN_K=True, DOT_F32=False, FLOAT_Z=False, DEQ16=True, ASM=asm, PF=asm, HALVES=halves,
                      CANON=canon, PDL=False)
        args, types, div16 = gemm.sass_signature(canon)
        sig = dict(zip(args, types)) | dict.fromkeys(consts, "constexpr")
        src = ASTSource(fn=triton.jit(gemm._gemm_kernel), signature=sig, constexprs=consts,
                        attrs={(i,): [["tt.divisibility", 16]] for i in div16})
        try:
            ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=4, num_stages=1)).asm["ttir"]
        except Exception as e:  # pragma: no cover - no CUDA backend / ptxas here
            _skip_unless_no_backend(e)
        counts = [ttir.count(p) for p in ("popc.b32", "prefetch.global.L2", "mov.b32 k960")]  # (k960: once a NIB2H)
        assert counts == ([4, 2, 2] if halves else [2, 1, 1] if asm else [0, 0, 0]), counts


def test_config_and_launch_errors():
    with pytest.raises(ValueError, match="block_m"):
        gemm.GemmConfig(block_m=8)
    with pytest.raises(ValueError, match="block_n"):
        gemm.GemmConfig(block_n=48)
    p = make_packed(16, 64, 16)
    lay = build_tile_layout(p)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gemm.launch_gemm(torch.randn(2, 64), lay, None, torch.empty(2, 16), gemm.GemmConfig())
    with pytest.raises(ValueError, match="features"):
        gemm.launch_gemm(torch.randn(2, 32).half(), lay, None, torch.empty(2, 16).half(), gemm.GemmConfig())
    x = torch.randn(2, 64).half()
    with pytest.raises(ValueError, match="y must be"):
        gemm.launch_gemm(x, lay, None, torch.empty(3, 16).half(), gemm.GemmConfig())
    with pytest.raises(ValueError, match="y must be"):
        gemm.launch_gemm(x, lay, None, torch.empty(2, 16).bfloat16(), gemm.GemmConfig())
    with pytest.raises(ValueError, match="bias"):
        gemm.launch_gemm(x, lay, torch.randn(15).half(), torch.empty(2, 16).half(), gemm.GemmConfig())
    with pytest.raises(ValueError, match="unit stride"):
        gemm.launch_gemm(x, lay, None, torch.empty(16, 2).half().t(), gemm.GemmConfig())


def test_auto_split_fills_the_grid():
    p = make_packed(64, 2048, 16)
    lay = build_tile_layout(p)
    cfg = gemm.GemmConfig(16, 64, waves=2.0)
    assert gemm.auto_split(4, lay, cfg, sms=132) == lay.n_ktiles // 2  # 1 tile: split as far as allowed
    assert gemm.auto_split(4, lay, gemm.GemmConfig(16, 64, split_k=3), sms=132) == 3
    assert gemm.auto_split(4096, lay, cfg, sms=4) == 1


TABLE = dispatch.DispatchTable(
    gemv_max_m=1,
    buckets=((16, gemm.GemmConfig(16, 16, split_k=2)), (1 << 62, gemm.GemmConfig(32, 32))),
    expand_min_m=40,
)


@pytest.mark.parametrize("m,path", [(1, "gemv"), (2, "gemm"), (16, "gemm"), (20, "gemm"), (40, "expand")])
def test_plan_dispatch_by_batch(m, path):
    p = make_packed(21, 200, 16, 4, 0.5, special="empty_rows")
    plan = dispatch.LinearPlan(p, table=TABLE)
    assert plan.path(m) == path
    x = torch.randn(m, 200).half()
    bias = torch.randn(21).half()
    y = plan(x, bias)
    assert y.shape == (m, 21)
    check(y, x, p, bias)


@pytest.mark.parametrize("g,fz", [(128, False), (16, True)])
def test_plan_serves_3_bit_layers_with_the_4_bit_kernels(g, fz):
    """A 3-bit layer (no kernel reads 3-bit codes) is planned with its codes widened to 4 bits, the same integers:
    every path (GEMV, GEMM, expansion, K % G != 0) matches the 3-bit layer's reference."""
    p = make_packed(19, 300, g, 3, 0.0 if g == 128 else 0.5, fz)
    plan = dispatch.LinearPlan(p, table=TABLE)
    assert plan.packed.bits == 4 and plan.kernel_ok and p.bits == 3
    assert torch.equal(reference.dequantize(plan.packed, torch.float32), reference.dequantize(p, torch.float32))
    for m, path in ((1, "gemv"), (5, "gemm"), (40, "expand")):
        assert plan.path(m) == path
        x = torch.randn(m, 300).half()
        check(plan(x), x, p)


def test_plan_canonical_tile_layout_holds_no_copy():
    """``LinearPlan(tile_layout="canonical")``: the GEMM's layout is an index over the layer's own tensors, every
    GEMM-range call right; a bad name is one clear error."""
    p = make_packed(21, 200, 16, 4, 0.5, special="empty_rows")
    plan = dispatch.LinearPlan(p, table=TABLE, tile_layout="canonical")
    assert plan.layout.canonical and plan.layout.qweight.data_ptr() == p.qweight.data_ptr()
    assert dispatch.LinearPlan(p, table=TABLE, tile_layout="copy").layout.version == 2
    for m in (2, 20):
        x = torch.randn(m, 200).half()
        check(plan(x), x, p)
    with pytest.raises(ValueError, match="tile_layout"):
        dispatch.LinearPlan(p, table=TABLE, tile_layout="view")


def test_h200_table_sends_m_up_to_3_to_the_v2_gemv(monkeypatch):
    """The default (H200) table: an irregular layer runs the batched v2 GEMV up to M = 3 (gemv_max_m, measured),
    the tensor-core GEMM from M = 4."""
    from gqsa.kernels import gemv_layout

    monkeypatch.delenv("GQSA_DISPATCH_TABLE", raising=False)
    assert dispatch.H200_TABLE.gemv_max_m == 3 <= gemv.V2_MAX_BATCH <= gemv_layout.MAX_MB
    p = make_packed(21, 200, 16, 4, 0.5)  # rows of about even length: the data-centric variant (v2)
    plan = dispatch.LinearPlan(p)
    assert plan.table is dispatch.H200_TABLE and plan.gemv.variant == "data"
    assert [plan.path(m) for m in (1, 2, 3, 4, 5)] == ["gemv"] * 3 + ["gemm"] * 2
    assert plan.gemv.layout is not None  # W4 G16: the v2 kernel
    seen = []
    real = gemv_layout.jitted
    monkeypatch.setattr(gemv_layout, "jitted", lambda fn, dns=(): (seen.append(fn.__name__), real(fn, dns))[1])
    x = torch.randn(3, 200).half()
    bias = torch.randn(21).half()
    y = plan(x, bias)
    assert seen == ["_gemv2p_kernel"] and y.shape == (3, 21)
    for i in range(3):
        check(y[i:i + 1], x[i:i + 1], p, bias)


def test_plan_prepares_each_batch_shape_once():
    """A batch shape seen before on the tensor-core path runs its prepared call (grid, split-K and
    constexprs kept): same results as a fresh plan; shapes, row strides, dtypes and bias or none each get
    their own; x without unit stride along K is copied and never prepared; a bad bias still raises."""
    p = make_packed(21, 200, 16, 4, 0.5, special="empty_rows")
    plan = dispatch.LinearPlan(p, table=TABLE)  # M = 6: split-K 2, so the workspace path too
    bias = torch.randn(21).half()
    for _ in range(3):
        x = torch.randn(2, 3, 200).half()
        y = plan(x, bias)
        assert y.shape == (2, 3, 21)  # the leading dimensions kept on the prepared path too
        check(y.reshape(6, 21), x.reshape(6, 200), p, bias)
    assert len(plan._calls) == 1
    x = torch.randn(6, 200).half()
    check(plan(x), x, p)
    check(plan(x.bfloat16()), x.bfloat16(), p)
    xs = torch.randn(6, 260).half()[:, 30:230]  # row stride 260
    for _ in range(2):
        check(plan(xs, bias), xs, p, bias)
    xt = torch.randn(200, 6).half().t()
    check(plan(xt), xt, p)
    assert len(plan._calls) == 4
    for _ in range(2):  # M = 40: the dense expansion + cuBLAS, prepared too
        x40 = torch.randn(40, 200).half()
        check(plan(x40, bias), x40, p, bias)
    assert len(plan._calls) == 5 and isinstance(plan._calls[(x40.shape, x40.stride(), x40.dtype, False)], gemv.DenseCall)
    with pytest.raises(ValueError, match="bias"):
        plan(torch.randn(2, 3, 200).half(), torch.randn(5).half())
    check(plan(x, bias.float()), x, p, bias)  # a bias in another dtype: converted on the checked path


def test_plan_leading_dims_fp32_and_dense_cache():
    p = make_packed(24, 160, 32, 4, 0.4)
    plan = dispatch.LinearPlan(p, table=TABLE, dense_min_m=8)
    x = torch.randn(2, 3, 160).bfloat16()  # 6 rows: GEMM
    y = plan(x)
    assert y.shape == (2, 3, 24)
    check(y.reshape(6, 24), x.reshape(6, 160), p)
    assert plan.path(8) == "dense-cache"
    x8 = torch.randn(8, 160).half()
    check(plan(x8), x8, p)
    xf = torch.randn(4, 160)  # float32: the reference-grade path
    torch.testing.assert_close(plan(xf), reference.linear(xf, p), rtol=1e-4, atol=1e-4)


def test_plan_bad_inputs_raise_one_line_errors():
    p = make_packed(16, 64, 16)
    plan = dispatch.LinearPlan(p, table=TABLE)
    with pytest.raises(ValueError, match="in_features"):
        plan(torch.randn(2, 32).half())
    with pytest.raises(ValueError, match="bias"):
        plan(torch.randn(2, 64).half(), torch.randn(5).half())
    with pytest.raises(ValueError, match="at least one"):
        dispatch.LinearPlan(p, table=dispatch.DispatchTable(gemv_max_m=1))


def test_table_json_round_trip(tmp_path, monkeypatch):
    t = dispatch.H200_TABLE
    assert dispatch.table_from_json(dispatch.table_to_json(t)) == t
    f = tmp_path / "t.json"
    import json

    f.write_text(json.dumps(dispatch.table_to_json(TABLE)))
    monkeypatch.setenv("GQSA_DISPATCH_TABLE", str(f))
    assert dispatch.default_table() == TABLE
    with pytest.raises(ValueError, match="dispatch table"):
        dispatch.table_from_json({"buckets": []})
