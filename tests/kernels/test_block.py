"""Block-uniform layers (``--allocation blockR``): detection and load-time layout
(``gqsa.kernels.block_layout``), the block tensor-core kernel (``gqsa.kernels.block_gemm``) against the
pure-torch reference, and the dispatch that picks it — on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, switched on per test by an autouse fixture).

Shapes are small; outputs are poisoned with NaN before every launch. Tolerances are those of
``test_gemv.py`` (``check``).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from gqsa import format as fmt  # noqa: E402
from gqsa import quant  # noqa: E402
from gqsa.kernels import block_gemm, block_layout, dispatch, gemm, jit, reference  # noqa: E402

from block_layers import make_block_packed  # noqa: E402  (same folder, on sys.path under pytest)
from test_gemv import check  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def launch(x, layout, cfg, bias=None):
    y = torch.full((x.shape[0], layout.shape[0]), float("nan"), dtype=x.dtype)
    out = block_gemm.launch_block(x, layout, bias, y, cfg)
    assert out.data_ptr() == y.data_ptr()
    return y


# ----------------------------------------------------------------------------- detection and layout


@pytest.mark.parametrize("rows,n", [(16, 40), (32, 100), (64, 130), (128, 300)])
def test_detect_block_rows(rows, n):
    p = make_block_packed(n, 256, 16, rows=rows)
    assert block_layout.detect_block_rows(p) == rows


def test_detect_irregular_is_none():
    from test_gemv import make_packed

    assert block_layout.detect_block_rows(make_packed(40, 256, 16, 4, 0.5)) is None
    p = make_block_packed(64, 256, 16, rows=16)
    col = p.col_idx.clone()
    row5 = slice(int(p.row_ptr[5]), int(p.row_ptr[6]))
    col[row5] = col[row5].flip(0).sort().values  # same set: still uniform
    assert block_layout.detect_block_rows(fmt.PackedLinear(**{**p.tensors(), "col_idx": col}, shape=p.shape,
                                                           bits=p.bits, group_size=p.group_size)) == 16
    last = int(p.row_ptr[6]) - 1  # one row's last kept column moved: no longer uniform
    free = sorted(set(range(p.n_group_cols)) - set(col[row5].tolist()))
    col[last] = free[-1] if free[-1] > int(col[last - 1]) else col[last]
    if int(col[last]) != int(p.col_idx[last]):
        bad = fmt.PackedLinear(**{**p.tensors(), "col_idx": col}, shape=p.shape, bits=p.bits, group_size=p.group_size)
        assert block_layout.detect_block_rows(bad) is None
    with pytest.raises(ValueError, match="not block-uniform"):
        block_layout.build_block_layout(make_packed(40, 256, 16, 4, 0.5))


@pytest.mark.parametrize("n,k,g,bits,fz,rows,uneven", [
    (37, 200, 16, 4, False, 16, True),  # K % G != 0, partial last block, uneven blocks, an empty block
    (70, 300, 32, 2, True, 32, True),  # 2 bits: 4 slots per byte tile, padding slots
    (130, 512, 64, 8, False, 64, False),
    (20, 256, 128, 4, True, 16, False),
])
def test_layout_dequantize_is_reference(n, k, g, bits, fz, rows, uneven):
    p = make_block_packed(n, k, g, bits, 0.5, fz, rows, uneven)
    lay = block_layout.build_block_layout(p)
    assert lay.rows == rows and lay.version == block_layout.BLOCK_LAYOUT_VERSION
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(block_layout.dequantize(lay, dt), reference.dequantize(p, dt))
    # a block128-uniform layer can be laid out with smaller blocks too
    lay16 = block_layout.build_block_layout(p, 16)
    assert torch.equal(block_layout.dequantize(lay16), reference.dequantize(p))


# ----------------------------------------------------------------------------- kernel

C = block_gemm.BlockConfig
# n, k, G, bits, float zeros, rows, uneven, M, dtype, bias, config
CASES = [
    (37, 200, 16, 4, False, 16, True, 1, torch.float16, True, C(np=2)),  # M = 1, K % G != 0, partial block
    (29, 256, 32, 4, True, 16, False, 2, torch.bfloat16, False, C(np=1, split_k=2)),  # float zeros, split-K
    (40, 300, 64, 4, False, 32, True, 16, torch.float16, True, C(np=2, split_k=3)),  # M bucket ≤ 16
    (70, 256, 16, 2, False, 16, True, 5, torch.float16, False, C(np=1)),  # 2 bits
    (50, 200, 32, 2, True, 32, False, 8, torch.bfloat16, True, C(np=2)),
    (40, 160, 16, 8, False, 16, False, 3, torch.bfloat16, True, C(np=2, split_k=2)),  # 8 bits
    (20, 300, 128, 8, True, 16, True, 4, torch.float16, False, C(np=1)),
    (64, 256, 16, 4, False, 64, False, 40, torch.float16, True, C(block_m=64, np=2, scale_after=False)),  # M ≤ 64
    (33, 200, 16, 4, True, 16, True, 40, torch.bfloat16, False, C(block_m=32, np=1)),
    (130, 256, 16, 4, False, 128, False, 70, torch.float16, False, C(block_m=64, np=1, scale_after=False)),
    (40, 200, 16, 2, False, 16, True, 33, torch.bfloat16, True, C(block_m=64, np=2, scale_after=False, split_k=1)),
    (40, 128, 16, 4, False, 16, False, 260, torch.float16, True, C(block_m=128, np=1, scale_after=False, split_k=1)),
    (40, 200, 16, 4, True, 16, True, 6, torch.bfloat16, True, C(np=2, col_vec=True)),  # the pipelined column load
    (48, 200, 16, 4, False, 16, True, 7, torch.float16, False, C(np=2, col_vec=True, split_k=2)),
    # wide: one dot of K = np·G per step (partial steps at the ends of uneven blocks, K % G != 0)
    (37, 200, 16, 4, False, 16, True, 20, torch.float16, True, C(block_m=32, np=4, scale_after=False, wide=True)),
    (29, 256, 32, 4, True, 16, False, 3, torch.bfloat16, False, C(np=2, scale_after=False, wide=True, split_k=2)),
    (70, 256, 16, 2, False, 16, True, 17, torch.bfloat16, True, C(block_m=32, np=2, scale_after=False, wide=True)),
    (40, 160, 16, 8, False, 16, False, 5, torch.float16, True, C(np=4, scale_after=False, wide=True, split_k=2)),
    (20, 300, 128, 8, True, 16, True, 4, torch.float16, False, C(np=1, scale_after=False, wide=True)),
    (130, 256, 16, 4, False, 128, True, 70, torch.float16, False, C(block_m=64, np=2, scale_after=False, wide=True,
                                                                     split_k=1)),
    # pre: the kept weights dequantized by a first pass, then a GEMM of K = np·G per step
    (37, 200, 16, 4, False, 16, True, 20, torch.float16, True, C(block_m=32, np=4, scale_after=False, pre=True)),
    (29, 256, 32, 4, True, 16, False, 3, torch.bfloat16, False, C(np=2, scale_after=False, pre=True, split_k=2)),
    (70, 256, 16, 2, False, 16, True, 17, torch.bfloat16, True, C(block_m=32, np=2, scale_after=False, pre=True)),
    (40, 160, 16, 8, False, 16, False, 5, torch.float16, True, C(np=4, scale_after=False, pre=True, split_k=3)),
    (20, 300, 128, 8, True, 16, True, 4, torch.float16, False, C(np=1, scale_after=False, pre=True)),
    (130, 256, 16, 4, False, 128, True, 70, torch.float16, False, C(block_m=64, np=8, scale_after=False, pre=True,
                                                                     split_k=1)),
    # pre with the scratch's weight tiles by TMA (tensor descriptors, emulated by the interpreter): the zeroed block
    # tails, partial steps, split-K, K % G != 0, a step wider than the scratch's rows (G = 128)
    (37, 200, 16, 4, False, 16, True, 20, torch.float16, True, C(block_m=32, np=4, scale_after=False, pre=True, tma=True)),
    (29, 256, 32, 4, True, 16, False, 3, torch.bfloat16, False, C(np=2, scale_after=False, pre=True, split_k=2,
                                                                  tma=True)),
    (70, 256, 16, 2, False, 16, True, 17, torch.bfloat16, True, C(block_m=32, np=2, scale_after=False, pre=True,
                                                                  tma=True, pre_tiles=3, pre_warps=2)),
    (40, 160, 16, 8, False, 16, False, 5, torch.float16, True, C(np=4, scale_after=False, pre=True, split_k=3, tma=True)),
    (20, 300, 128, 8, True, 16, True, 4, torch.float16, False, C(np=1, scale_after=False, pre=True, tma=True)),
    (130, 256, 16, 4, False, 128, True, 70, torch.float16, False, C(block_m=64, np=8, scale_after=False, pre=True,
                                                                     split_k=1, tma=True)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-G{c[2]}-b{c[3]}-fz{int(c[4])}-R{c[5]}-"
                                                       f"u{int(c[6])}-M{c[7]}-{str(c[8])[6:]}")
def test_block_kernel_matches_reference(case):
    n, k, g, bits, fz, rows, uneven, m, dtype, has_bias, cfg = case
    p = make_block_packed(n, k, g, bits, 0.5, fz, rows, uneven)
    lay = block_layout.build_block_layout(p)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    check(launch(x, lay, cfg, bias), x, p, bias)
    ws = gemm.workspace(torch.device("cpu"))  # split-K leaves the workspace clean
    assert not bool(ws.partial.any()) and not bool(ws.counters.any())


@pytest.mark.parametrize("idx", [0, 17, 21])  # (plain; wide, split-K 2; pre, split-K 2)
def test_uniform_blocks_need_no_block_pointers(idx, monkeypatch):
    """Blocks that all hold the same slots (row-balanced block masks) are launched with that count (``spb``): the
    kernel finds a block's slots at ``block · SPB`` instead of loading ``block_ptr``, with the same outputs bit for
    bit; uneven blocks get ``uniform_slots = 0``."""
    n, k, g, bits, fz, rows, uneven, m, dtype, has_bias, cfg = CASES[idx]
    p = make_block_packed(n, k, g, bits, 0.5, fz, rows, False)
    lay = block_layout.build_block_layout(p)
    per_block = lay.block_ptr[1:] - lay.block_ptr[:-1]
    assert lay.uniform_slots == int(per_block[0]) > 0 and bool((per_block == lay.uniform_slots).all())
    assert block_layout.build_block_layout(make_block_packed(n, k, g, bits, 0.5, fz, rows, True)).uniform_slots == 0
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ys = []
    for uniform in (True, False):
        monkeypatch.setattr(jit, "UNIFORM", uniform)
        call = block_gemm.BlockCall(lay, cfg, m, dtype, False, k, n, 1)
        assert call.consts["UNI"] == uniform and call.ints[-1] == (lay.uniform_slots if uniform else 0)
        ys.append(launch(x, lay, cfg))
    assert torch.equal(ys[0], ys[1])
    check(ys[0], x, p)


def test_tma_pre_pass_writes_zeros_past_each_block(monkeypatch):
    """The TMA step copies whole ``np·G``-column tiles of the ``pre`` scratch, so with ``zero`` the pass writes
    every column up to the row stride: the kept weights where a block has slots, zeros past them (without
    ``zero`` those columns keep whatever the allocation held: NaN here)."""
    p = make_block_packed(70, 300, 16, 4, 0.5, False, 16, True)  # uneven blocks, K % G != 0
    lay = block_layout.build_block_layout(p)
    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    wz = block_gemm.dequantize_kept(lay, torch.float16, zero=True)
    wz3 = block_gemm._Dequant(lay, torch.float16, True, 3, 2)()  # 3 byte tiles a program: the last one past the stride
    wn = block_gemm.dequantize_kept(lay, torch.float16)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.equal(wz3, wz)
    dense = block_layout.dequantize(lay, torch.float16)
    g, r = lay.group_size, lay.rows
    tails = 0
    for b in range(lay.n_blocks):
        lo, hi = int(lay.block_ptr[b]), int(lay.block_ptr[b + 1])
        rows = slice(b * r, (b + 1) * r)
        for j, col in enumerate(lay.cols[lo:hi].tolist()):
            kept = wz[rows, j * g:(j + 1) * g]
            want = dense[b * r:(b + 1) * r, col * g:(col + 1) * g] if col >= 0 else torch.zeros_like(kept)
            n_ok = min(r, lay.shape[0] - b * r)
            assert torch.equal(kept[:n_ok, :want.shape[1]], want[:n_ok])
        assert bool((wz[rows, (hi - lo) * g:] == 0).all())
        tails += wz.shape[1] - (hi - lo) * g
        assert bool(wn[rows, (hi - lo) * g:].isnan().all())
    assert tails > 0


def test_tma_is_used_where_available_and_stages_fit_shared_memory(monkeypatch):
    p = make_block_packed(64, 256, 16, 4, 0.5, False, 16, True)
    lay = block_layout.build_block_layout(p)
    cfg = C(block_m=32, np=4, scale_after=False, pre=True, tma=True)
    assert block_gemm.BlockCall(lay, cfg, 40, torch.float16, False, 256, 64, 1).consts["TMA"]  # interpreter
    assert not block_gemm.BlockCall(lay, dataclasses.replace(cfg, tma=False), 40, torch.float16, False, 256, 64,
                                    1).consts["TMA"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not block_gemm.tma_available(torch.device("cpu"))
    with pytest.raises(ValueError, match="tma needs pre"):
        C(tma=True)
    # [R, np·G] + [np·G, block_m] fp16 per stage: 64 KiB at R = block_m = 128, np·G = 128 → 3 stages of 5
    big = C(block_m=128, np=1, num_stages=5, scale_after=False, pre=True, tma=True)
    assert block_gemm.fit_stages(big, 128, 128) == 3
    assert block_gemm.fit_stages(big, 128, 16) == 5
    assert block_gemm.fit_stages(C(num_stages=5), 128, 128) == 5  # the narrow kernel: untouched


def test_block_kernel_nothing_kept():
    p = make_block_packed(32, 128, 16, rows=16, sparsity=1.0)
    p = fmt.PackedLinear(row_ptr=torch.zeros(33, dtype=torch.int32), col_idx=p.col_idx[:0], qweight=p.qweight[:0],
                         scales=p.scales[:0], zeros=p.zeros[:0], shape=(32, 128), bits=4, group_size=16)
    lay = block_layout.build_block_layout(p, 16)
    x = torch.randn(3, 128).half()
    bias = torch.randn(32).half()
    assert torch.equal(launch(x, lay, C(np=1), bias), bias.expand(3, 32))
    assert torch.equal(launch(x, lay, C(np=2, scale_after=False, pre=True), bias), bias.expand(3, 32))


def test_block_launch_rejects_bad_input():
    lay = block_layout.build_block_layout(make_block_packed(32, 128, 16, rows=16))
    y = torch.empty(2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        block_gemm.launch_block(torch.randn(2, 128), lay, None, y, C())
    with pytest.raises(ValueError, match="features"):
        block_gemm.launch_block(torch.randn(2, 64).half(), lay, None, y, C())
    with pytest.raises(ValueError, match="y must be"):
        block_gemm.launch_block(torch.randn(3, 128).half(), lay, None, y, C())
    with pytest.raises(ValueError, match="block_m"):
        C(block_m=8)
    with pytest.raises(ValueError, match="wide"):
        C(wide=True)  # scale_after is on by default: a wide step scales every weight first
    with pytest.raises(ValueError, match="wide"):
        C(np=3, scale_after=False, wide=True)
    with pytest.raises(ValueError, match="pre"):
        C(pre=True)
    with pytest.raises(ValueError, match="pre"):
        C(np=2, scale_after=False, wide=True, pre=True)


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_picks_block_path():
    p = make_block_packed(64, 256, 16, rows=32)
    plan = dispatch.LinearPlan(p)
    assert plan.block_rows == 32 and plan.block is not None and plan.layout is None
    tb = dispatch.H200_TABLE.block
    for m in (1, 3, 16, 40, 300):
        want = "expand" if m >= tb.expand_from(32) else "gemv" if m <= tb.gemv_max_m else "block"
        assert plan.path(m) == want
    for m in (3, 17):
        x = torch.randn(m, 256).half()
        check(plan(x), x, p)
    # block16: the irregular GEMM in its range (TileLayout built on first use), the block kernel below
    p16 = make_block_packed(48, 256, 16, rows=16)
    plan16 = dispatch.LinearPlan(p16)
    assert plan16.block_rows == 16 and plan16.path(8) == "block" and plan16.path(tb.tile_from(16)) == "gemm"
    assert plan16.layout is None
    x = torch.randn(tb.tile_from(16), 256).half()
    check(plan16(x), x, p16)
    assert plan16.layout is not None
    from test_gemv import make_packed

    irregular = dispatch.LinearPlan(make_packed(40, 256, 16, 4, 0.5))
    assert irregular.block is None and irregular.path(16) == "gemm"


def test_dispatch_block128_large_m_runs_the_pre_kernels_not_the_expansion():
    p = make_block_packed(130, 256, 16, rows=128, uneven=True)
    plan = dispatch.LinearPlan(p)
    tb = dispatch.H200_TABLE.block
    assert plan.block_rows == 128 and plan.path(300) == "block" and plan.path(1 << 20) == "block"
    assert tb.config(128, 300).pre and tb.config(64, 300).pre
    x = torch.randn(300, 256).half()
    check(plan(x), x, p)


def test_dispatch_dense_block_layers_take_the_gemv_and_the_expansion():
    """A layer that keeps every group (sparsity 0: block-uniform at every height; here 3-bit, widened) takes the
    GEMV up to ``dense_gemv_max_m`` rows and the dense expansion from ``dense_expand_min_m`` (its block kernels do
    twice an S50 layer's work there); the S50 block128 layer keeps the block kernel from M = 2 and its ``pre``
    kernels; a table without the entries keeps the height's rules; the entries survive the JSON round trip."""
    import dataclasses

    tb = dispatch.H200_TABLE.block
    assert tb.dense_expand_min_m == 256 and tb.dense_gemv_max_m == 2 > tb.gemv_max_m
    dense = make_block_packed(128, 256, 32, bits=3, rows=128, sparsity=0.0)  # 3 bits: widened to 4 in the plan
    plan = dispatch.LinearPlan(dense)
    assert plan.block_rows == 128 and plan.block_dense and plan.packed.bits == 4
    assert [plan.path(m) for m in (1, 2, 3)] == ["gemv", "gemv", "block"]
    assert plan.path(255) == "block" and plan.path(256) == "expand"
    for m in (1, 2, 6, 256):  # the GEMV (one row, two), the block kernel, the expansion: against the 3-bit layer
        x = torch.randn(m, 256).half()
        check(plan(x), x, dense)
    sparse = dispatch.LinearPlan(make_block_packed(128, 256, 16, rows=128))
    assert not sparse.block_dense and sparse.path(4096) == "block"
    assert [sparse.path(m) for m in (1, 2, 3)] == ["gemv", "block", "block"]
    off = dataclasses.replace(dispatch.H200_TABLE, block=dataclasses.replace(tb, dense_expand_min_m=None,
                                                                             dense_gemv_max_m=0))
    plan_off = dispatch.LinearPlan(dense, table=off)
    assert plan_off.path(4096) == "block" and plan_off.path(2) == "block"
    assert dispatch.table_from_json(dispatch.table_to_json(off)) == off
    assert dispatch.table_from_json(dispatch.table_to_json(dispatch.H200_TABLE)) == dispatch.H200_TABLE


def test_dispatch_wide_group_block_layers_take_the_expansion_from_group_expand_min_m():
    """Block and cluster layers of groups of 64 take the dense expansion from ``group_expand_min_m`` whatever their
    height (their ``pre`` kernels lost to it); G16 layers keep their height's rule (never for block64/128); a table
    without the entry keeps the block kernels; the entry survives the JSON round trip."""
    import dataclasses

    tb = dispatch.H200_TABLE.block
    (g_min, m_exp), = tb.group_expand_min_m
    never = 1 << 62  # the height's value for block64/128
    assert g_min == 64 and tb.expand_from(64) == never and tb.expand_from(128) == never
    for rows, cluster in ((64, False), (128, True)):
        p = make_block_packed(rows + 36, 320, 64, rows=rows, sparsity=0.3, cluster=cluster)
        plan = dispatch.LinearPlan(p)
        assert plan.block_rows == rows and not plan.block_dense
        assert plan.path(m_exp - 1) == "block" and plan.path(m_exp) == "expand" and plan.path(1 << 20) == "expand"
        x = torch.randn(m_exp, 320).half()
        check(plan(x), x, p)
        assert tb.expand_for(rows, 128) == m_exp and tb.expand_for(rows, 32) == never
    g16 = dispatch.LinearPlan(make_block_packed(64, 256, 16, rows=64, sparsity=0.3))
    assert g16.path(m_exp) == "block" and g16.path(1 << 20) == "block"
    off = dataclasses.replace(dispatch.H200_TABLE, block=dataclasses.replace(tb, group_expand_min_m=()))
    p64 = make_block_packed(64, 256, 64, rows=64, sparsity=0.3)
    assert dispatch.LinearPlan(p64, table=off).path(1 << 20) == "block"
    assert dispatch.table_from_json(dispatch.table_to_json(off)) == off
    assert dispatch.table_from_json(dispatch.table_to_json(dispatch.H200_TABLE)).block.group_expand_min_m == \
        tb.group_expand_min_m


def test_dispatch_prepared_block_calls_with_the_pre_pass_and_block_order_stores():
    """The prepared calls of a clusterR layer (row map): the ``pre`` pass with split-K at M ≤ 4, block-order
    stores + the gather above; every batch shape, with and without a bias, prepared once and right each
    time (the split-K workspace left zero by every call)."""
    from gqsa import prune

    n, k, g = 100, 256, 16
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k // g, g, generator=gen)
    s, z = quant.minmax_params(w, 4)
    mask = prune.select_mask(torch.rand(n, k // g, generator=gen) ** 3, 0.5, "cluster16")
    p = fmt.pack(quant.quantize(w, s, z, 4), s, z, mask, (n, k), 4, g)
    table = dispatch.DispatchTable(
        gemv_max_m=1, buckets=((1 << 62, gemm.GemmConfig()),),
        block=dispatch.BlockTable(buckets=((16, ((4, C(np=4, scale_after=False, pre=True, split_k=2)),
                                                 (1 << 62, C(np=2, block_out=True)))),)))
    plan = dispatch.LinearPlan(p, table=table)
    assert plan.block is not None and plan.block.row_map is not None
    bias = torch.randn(n, generator=gen).half()
    for m in (3, 6):
        for b in (bias, None):
            for _ in range(2):
                x = torch.randn(1, m, k, generator=gen).half()
                y = plan(x) if b is None else plan(x, b)
                assert y.shape == (1, m, n)
                check(y[0], x[0], p, b)
    assert len(plan._calls) == 4
    assert sorted((c.pre is not None, c.block_out) for c in plan._calls.values()) == [(False, True)] * 2 + [(True, False)] * 2


def test_configs_tuned_at_g16_keep_their_step_size_at_larger_groups():
    wide = C(block_m=16, np=4, scale_after=False, wide=True)
    assert block_gemm.for_group(wide, 16) is wide
    assert block_gemm.for_group(wide, 32).np == 2 and block_gemm.for_group(wide, 64).np == 1
    assert block_gemm.for_group(C(np=2, scale_after=False, pre=True), 128).np == 1
    assert block_gemm.for_group(wide, 64).wide  # the rest of the configuration stays


def test_block_table_json_roundtrip():
    t = dispatch.H200_TABLE
    assert t.block is not None
    assert dispatch.table_from_json(dispatch.table_to_json(t)) == t
    assert t.block.config(32, 16) == t.block.config(16, 16)  # an unmeasured height takes the one below
    assert t.block.config(128, 1 << 20) == t.block.buckets[-1][1][-1][1]


# ----------------------------------------------------------------------------- the pruning options


@pytest.mark.parametrize("allocation,rows", [("block16", 16), ("block64", 64), ("cluster16", 16), ("cluster32", 32)])
def test_allocations_take_the_block_path(allocation, rows):
    """Masks from ``prune.select_mask`` (the lead's ``--allocation blockR`` / ``clusterR``) are detected
    and served by the block kernel; clusterR through a row map (rows not consecutive)."""
    from gqsa import prune

    n, k, g = 100, 256, 16
    gen = torch.Generator().manual_seed(3)
    c = k // g
    w = torch.randn(n, c, g, generator=gen)
    s, z = quant.minmax_params(w, 4)
    q = quant.quantize(w, s, z, 4)
    score = torch.rand(n, c, generator=gen) ** 3
    mask = prune.select_mask(score, 0.5, allocation)
    p = fmt.pack(q, s, z, mask, (n, k), 4, g)
    p.validate()
    plan = dispatch.LinearPlan(p)
    assert plan.block_rows == rows and plan.block is not None
    if allocation.startswith("cluster") and block_layout.detect_block_rows(p) is None:
        assert plan.block.row_map is not None
    assert torch.equal(block_layout.dequantize(plan.block), reference.dequantize(p))
    x = torch.randn(5, k, generator=gen).half()
    bias = torch.randn(n, generator=gen).half()
    check(launch(x, plan.block, C(np=2), bias), x, p, bias)
    check(launch(x, plan.block, C(np=1, split_k=3), bias), x, p, bias)
    check(launch(x, plan.block, C(np=2, scale_after=False, wide=True, split_k=2), bias), x, p, bias)
    check(launch(x, plan.block, C(np=4, scale_after=False, pre=True, split_k=2), bias), x, p, bias)
    if plan.block.row_map is not None:  # y in block order + a gather (block_out) as well as through the map
        check(launch(x, plan.block, C(np=2, block_out=True), bias), x, p, bias)
        check(launch(x, plan.block, C(np=1, split_k=3, block_out=True), bias), x, p, bias)
        check(launch(x, plan.block, C(np=4, scale_after=False, pre=True, block_out=True), bias), x, p, bias)
        big = torch.full((x.shape[0], n + 8), float("nan"), dtype=x.dtype)  # y a column slice: not contiguous
        block_gemm.launch_block(x, plan.block, bias, big[:, 4:4 + n], C(np=2, block_out=True))
        check(big[:, 4:4 + n], x, p, bias)
        assert big[:, :4].isnan().all() and big[:, 4 + n:].isnan().all()


def test_row_clusters_detection_and_map():
    p = make_block_packed(64, 256, 16, rows=16)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    dense = reference.dequantize(p)
    # the same layer with its rows shuffled: no longer consecutive blocks, still clusters of 16
    mask = torch.zeros(64, 16, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(64), (p.row_ptr[1:] - p.row_ptr[:-1]).long())
    mask[rows, p.col_idx.long()] = True
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 16, 16, generator=gen)
    s, z = quant.minmax_params(w, 4)
    shuffled = fmt.pack(quant.quantize(w, s, z, 4), s, z, mask[perm], (64, 256), 4, 16)
    assert block_layout.detect_block_rows(shuffled) is None
    r, row_map = block_layout.detect_row_clusters(shuffled)
    assert r == 16 and sorted(row_map[row_map >= 0].tolist()) == list(range(64))
    lay = block_layout.build_block_layout(shuffled, r, row_map=row_map)
    assert torch.equal(block_layout.dequantize(lay), reference.dequantize(shuffled))
    assert torch.equal(lay.row_map[lay.row_pos].long(), torch.arange(64))  # row_pos: the map's inverse
    with pytest.raises(ValueError, match="row map"):
        block_layout.build_block_layout(shuffled, r, row_map=torch.arange(64, dtype=torch.int32))
    from test_gemv import make_packed

    assert block_layout.detect_row_clusters(make_packed(40, 256, 16, 4, 0.5)) is None
    # what gqsa inspect prints: which kernels each layer can use
    assert block_layout.kernel_layout(shuffled) == "cluster16"
    assert block_layout.kernel_layout(p).startswith("block")  # 16-row blocks (or taller by chance)
    assert block_layout.kernel_layout(make_block_packed(130, 256, 16, rows=64)) == "block64"
    assert block_layout.kernel_layout(make_packed(40, 256, 16, 4, 0.5)) == "irregular"
    del dense


def test_cluster128_layers_take_the_block_order_store_from_17_rows():
    """The H200 table writes y of clusterR layers in block order (then gathers it into place) from
    M = 17 on for R = 128 (the ``pre`` kernels of M ≥ 65 too), where that measured faster; through the map
    at M ≤ 16."""
    from gqsa import prune

    n, k, g = 256, 128, 16
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k // g, g, generator=gen)
    s, z = quant.minmax_params(w, 4)
    mask = prune.select_mask(torch.rand(n, k // g, generator=gen), 0.5, "cluster128")
    p = fmt.pack(quant.quantize(w, s, z, 4), s, z, mask, (n, k), 4, g)
    plan = dispatch.LinearPlan(p)
    assert plan.block_rows == 128 and plan.block.row_map is not None
    table = plan.table.block
    assert table.config(128, 20).block_out and not table.config(128, 4).block_out
    assert table.config(128, 100).pre and table.config(128, 100).block_out
    assert table.config(128, 2048).pre and table.config(128, 2048).block_out
    for m in (4, 20, 100):
        x = torch.randn(m, k, generator=gen).half()
        assert plan.path(m) == "block"
        check(plan(x), x, p, None)


def _device_bytes(*objects) -> int:
    """Bytes of the distinct tensor storages held by ``objects`` (their attributes, three levels down)."""
    seen = {}

    def walk(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            seen.setdefault(obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        elif depth <= 3 and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                for e in v if isinstance(v, (list, tuple)) else (v,):
                    walk(e, depth + 1)

    for o in objects:
        walk(o)
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["row", "block64", "cluster64"])
def test_resident_factors_match_what_the_plans_hold(kind):
    """block_layout.RESIDENT_PER_PACKED_BYTE (what `gqsa inspect` and `gqsa bench`'s memory check count) against
    what a layer's plan holds: its packed tensors, the GEMV's, the block kernel's or tile GEMM's layout and, for
    block layers, the hand-written kernel's. Within 0.25 below the factor: a layout change that moves them fails."""
    from gqsa.bench.synthetic import random_packed
    from gqsa.kernels.mma_layout import build_mma_layout

    gen = torch.Generator().manual_seed(0)
    sparsity, g = (0.3, 64) if kind == "cluster64" else (0.5, 16)
    p = random_packed(1024, 2048, sparsity, 4, g, "cpu", gen, block_rows=64 if kind != "row" else 0,
                      clustered=kind == "cluster64")
    plan = dispatch.LinearPlan(p)
    plan.gemv  # (built on first use for block layers)
    layout = block_layout.kernel_layout(p)
    assert (layout == "irregular") == (kind == "row")
    held = [p, plan] + ([build_mma_layout(plan.block)] if plan.block is not None else [])
    ratio = _device_bytes(*held) / p.nbytes()
    factor = block_layout.RESIDENT_PER_PACKED_BYTE["irregular" if kind == "row" else "block"]
    assert factor - 0.25 <= ratio <= factor, ratio
    assert block_layout.resident_bytes(p.nbytes(), layout) == int(factor * p.nbytes())
