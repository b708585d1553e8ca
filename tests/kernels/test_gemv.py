"""Fused GQSA kernels (``gqsa.kernels.gemv``) against the pure-torch reference, on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter is switched on by an autouse fixture for this module only; the kernels read the
variable when they are launched (not when ``gemv`` is imported), so the order in which test modules
import things does not matter. Shapes are small: the interpreter runs every program in Python.
Outputs are poisoned with NaN before every launch, so an unwritten element fails.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from gqsa import format as fmt  # noqa: E402
from gqsa import quant  # noqa: E402
from gqsa.kernels import gemv, gemv_layout, reference  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def make_packed(n, k, g, bits=4, sparsity=0.5, float_zeros=False, special=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = math.ceil(k / g)
    w = torch.randn(n, c, g, generator=gen)
    if k % g:  # padding of the last group column: not part of the range
        valid = (torch.arange(c * g).reshape(c, g) < k)[None]
        s, z = quant.minmax_params(w, bits, valid=valid)
    else:
        s, z = quant.minmax_params(w, bits)
    if float_zeros:
        z = z + torch.rand(z.shape, generator=gen) * 0.8 - 0.4
    q = quant.quantize(w, s, z, bits)
    mask = torch.rand(n, c, generator=gen) >= sparsity
    if special == "empty_rows":
        mask[::3] = False
        mask[-1] = False
    elif special == "one_row":  # one row holds every kept group, all others empty
        mask[:] = False
        mask[n // 2] = True
    elif special == "empty":
        mask[:] = False
    p = fmt.pack(q, s, z, mask, (n, k), bits, g, float_zeros=float_zeros)
    p.validate()
    return p


def run(x, p, variant, bias=None, tasks=None):
    out = torch.full((*x.shape[:-1], p.shape[0]), float("nan"), dtype=x.dtype)
    y = gemv.gqsa_linear(x, p, bias, tasks=tasks, variant=variant, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y


def check(y, x, p, bias=None):
    ref = reference.linear(x.float(), p, None if bias is None else bias.float())
    assert bool(torch.isfinite(y).all()), "unwritten (NaN) output elements"
    err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))
    tol = 1e-2 if x.dtype == torch.bfloat16 else 2e-3
    assert err < tol, f"relative error {err:.2e}"


CASES = [
    # n, k, G, bits, sparsity, float zeros, special, batch, dtype, bias
    (37, 200, 16, 4, 0.5, False, None, 1, torch.float16, False),  # K % G != 0
    (29, 256, 32, 4, 0.3, True, None, 3, torch.bfloat16, True),
    (20, 300, 64, 4, 0.6, False, "empty_rows", 2, torch.float16, True),
    (9, 500, 128, 4, 0.2, False, None, 16, torch.float16, False),  # K % G != 0, batch 16
    (23, 160, 16, 4, 0.0, False, "one_row", 1, torch.float16, True),
    (17, 96, 16, 4, 0.5, False, "empty", 2, torch.float16, True),
    (31, 256, 16, 2, 0.5, False, None, 1, torch.float16, False),
    (19, 200, 32, 2, 0.4, True, None, 4, torch.float16, False),
    (25, 160, 16, 8, 0.5, False, None, 5, torch.bfloat16, True),
    (13, 300, 128, 8, 0.5, True, None, 1, torch.float16, False),
]


@pytest.mark.parametrize("variant", ["task", "data"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-G{c[2]}-b{c[3]}-S{c[4]}-fz{int(c[5])}-"
                                                       f"{c[6]}-B{c[7]}-{str(c[8])[6:]}")
def test_kernel_matches_reference(case, variant):
    n, k, g, bits, sp, fz, special, b, dtype, has_bias = case
    p = make_packed(n, k, g, bits, sp, fz, special)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    tasks = None
    if variant == "task":  # small tasks so that rows are cut across several tasks
        tasks = gemv.build_task_table(p, task_size=24, block_g=8, num_warps=1)
        if special != "empty" and p.nnz > 24:
            assert tasks.num_tasks > 1
    check(run(x, p, variant, bias, tasks), x, p, bias)
    if variant == "task":  # a second launch reuses the merge workspace: it must come back clean
        assert not bool(tasks.workspace.any()) and not bool(tasks.counters.any())
        check(run(x, p, variant, bias, tasks), x, p, bias)


def test_default_task_table_and_leading_dims():
    p = make_packed(40, 272, 16, sparsity=0.5)
    x = torch.randn(2, 1, 272).half()
    y = run(x, p, "auto")  # builds and memoizes the task table itself
    assert y.shape == (2, 1, 40)
    check(y.reshape(2, 40), x.reshape(2, 272), p)
    assert gemv.cached_task_table(p) is gemv.cached_task_table(p)


def test_task_table_covers_every_row_once():
    p = make_packed(50, 320, 16, sparsity=0.5, special="empty_rows")
    t = gemv.build_task_table(p, task_size=16, block_g=8)
    rp = p.row_ptr.long()
    tab = t.table.long()
    visits = torch.zeros(50, dtype=torch.long)
    for i in range(t.num_tasks):
        visits[tab[i, 0]:tab[i, 1]] += 1
    # a row is visited by every task it overlaps, and an empty row by exactly one
    for r in range(50):
        lo, hi = int(rp[r]), int(rp[r + 1])
        expect = 1 if lo == hi else (hi - 1) // t.task_size - lo // t.task_size + 1
        assert int(visits[r]) == expect, r
    assert t.num_split_rows == int(((rp[1:] - 1) // t.task_size != rp[:-1] // t.task_size)
                                   .logical_and(rp[1:] > rp[:-1]).sum())


def test_dense_expand_is_bit_exact():
    for bits, g, fz in ((4, 16, False), (4, 128, True), (2, 32, False), (8, 16, True)):
        p = make_packed(21, 2100 if g == 16 else 200, g, bits, 0.5, fz)  # K > 1024: two blocks of zeros
        assert torch.equal(gemv.dequantize_dense(p, torch.float16), reference.dequantize(p, torch.float16))
        # the kernel writes every element itself (zeros where pruned): NaN-filled memory in, nothing left of it
        poisoned = torch.full(p.shape, float("nan"), dtype=torch.float16)
        assert gemv.dequantize_dense(p, torch.float16, out=poisoned) is poisoned
        assert torch.equal(poisoned, reference.dequantize(p, torch.float16))
        # the interpreter truncates float32 -> bfloat16 (compiled code and torch round to nearest, and
        # the GPU check in benchmarks/gemv.py --check compares them bit for bit): one bf16 ulp here
        a, b = gemv.dequantize_dense(p, torch.bfloat16).float(), reference.dequantize(p, torch.bfloat16).float()
        assert bool(((a - b).abs() <= b.abs() * 2**-7).all())
    with pytest.raises(ValueError, match="out must be"):
        gemv.dequantize_dense(p, torch.float16, out=torch.empty(3, 3, dtype=torch.float16))


def test_prefill_path_above_batch_16():
    p = make_packed(24, 200, 16, sparsity=0.5)
    x = torch.randn(20, 200).half()
    bias = torch.randn(24).half()
    check(run(x, p, "auto", bias), x, p, bias)
    check(run(x, p, "task", bias), x, p, bias)  # task/data fall through to dense above 16 rows


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = make_packed(12, 64, 16)
    x = torch.randn(3, 64).half()
    assert torch.equal(gemv.gqsa_linear(x, p), reference.linear(x, p))


def test_three_bit_layers_use_reference():
    p = make_packed(12, 64, 16, bits=3)
    x = torch.randn(2, 64).half()
    assert torch.equal(gemv.gqsa_linear(x, p, variant="task"), reference.linear(x, p))


def test_bad_inputs_raise_value_error():
    p = make_packed(12, 64, 16)
    x = torch.randn(1, 64).half()
    with pytest.raises(ValueError, match="last dimension"):
        gemv.gqsa_linear(torch.randn(1, 63).half(), p)
    with pytest.raises(ValueError, match="dtype"):
        gemv.gqsa_linear(x.to(torch.int32), p)
    with pytest.raises(ValueError, match="bias"):
        gemv.gqsa_linear(x, p, torch.randn(11).half())
    with pytest.raises(ValueError, match="variant"):
        gemv.gqsa_linear(x, p, variant="fast")
    with pytest.raises(ValueError, match="tasks"):
        gemv.gqsa_linear(x, p, tasks="table", variant="task")
    other = make_packed(12, 64, 16, sparsity=0.2, seed=3)
    with pytest.raises(ValueError, match="task table"):
        gemv.gqsa_linear(x, p, tasks=gemv.build_task_table(other), variant="task")
    bad = fmt.PackedLinear(**{**p.tensors(), "scales": p.scales.float()}, shape=p.shape, bits=4, group_size=16)
    with pytest.raises(ValueError, match="scales"):
        gemv.gqsa_linear(x, bad)
    with pytest.raises(ValueError, match="out"):
        gemv.gqsa_linear(x, p, out=torch.empty(1, 11).half())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device|on cuda"):
            gemv.gqsa_linear(x.cuda(), p)
    meta = torch.empty(1, 64, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match="on meta"):
        gemv.gqsa_linear(meta, p)


def test_prepared_plan_matches_reference():
    p = make_packed(33, 272, 16, sparsity=0.4, special="empty_rows")
    bias = torch.randn(33).half()
    for variant in ("task", "data"):
        plan = gemv.prepare(p, variant=variant, task_size=16, block_g=8, num_warps=1) if variant == "task" \
            else gemv.prepare(p, variant="data")
        for b in (1, 4, 20):
            x = torch.randn(b, 272).half()
            check(plan(x, bias), x, p, bias)
        x = torch.randn(2, 272).to(torch.bfloat16)
        check(plan(x), x, p)


@pytest.mark.parametrize("case", [c for c in CASES if c[3] <= 4][:6], ids=lambda c: f"{c[0]}x{c[1]}-G{c[2]}-b{c[3]}")
def test_sixteen_code_units(case, monkeypatch):
    """Units of 16 codes per thread (one int64 code word, 32 bytes of activations)."""
    monkeypatch.setattr(gemv, "UNIT_CODES", 16)
    n, k, g, bits, sp, fz, special, b, dtype, has_bias = case
    p = make_packed(n, k, g, bits, sp, fz, special)
    x = torch.randn(b, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    tasks = gemv.build_task_table(p, task_size=24, block_g=8, num_warps=1)
    assert tasks.unit_codes == 16
    check(run(x, p, "task", tasks=tasks), x, p)
    check(run(x, p, "data"), x, p)


def test_auto_variant_and_dispatch():
    balanced = make_packed(24, 256, 16, sparsity=0.5)
    skewed = make_packed(24, 256, 16, sparsity=0.0, special="one_row")
    assert gemv.auto_variant(balanced) == "data"
    assert gemv.auto_variant(skewed) == "task"
    plan = gemv.prepare(skewed)
    assert plan.variant == "task" and plan.tasks is not None
    for b in (1, 3, 5, 17):  # 5 and 17 rows: dense expansion + cuBLAS (reference GEMM on the CPU)
        x = torch.randn(b, 256).half()
        check(plan(x), x, skewed)
        check(run(x, balanced, "auto"), x, balanced)


# ---------------------------------------------------------------- v2: load-time layout (issue 12)
V2_CASES = [
    # n, k, G, bits, sparsity, special, dtype, bias
    (37, 200, 16, 4, 0.5, None, torch.float16, False),  # K % G != 0, uneven rows
    (29, 256, 32, 4, 0.3, None, torch.bfloat16, True),
    (20, 300, 64, 4, 0.6, "empty_rows", torch.float16, True),
    (9, 500, 128, 4, 0.2, None, torch.bfloat16, False),  # K % G != 0
    (23, 160, 16, 4, 0.0, "one_row", torch.float16, True),  # one row spans several steps
    (17, 96, 16, 4, 0.5, "empty", torch.float16, True),
    (31, 256, 16, 2, 0.5, None, torch.float16, False),
    (19, 200, 32, 2, 0.4, None, torch.bfloat16, True),
    (13, 300, 128, 8, 0.5, None, torch.float16, True),
    (6, 4800, 16, 4, 0.0, "one_row", torch.float16, True),  # a row of 300 groups: 3 steps, the last moved back
]


def test_v2_long_rows_and_unit_sizes():
    """Rows over several steps (the last step moved back over groups already counted), 8-code units
    (2 threads per group) and 8 units per thread."""
    p = make_packed(7, 4000, 16, 4, 0.3, seed=7)  # rows of ~175 groups
    x = torch.randn(1, 4000, generator=torch.Generator().manual_seed(8)).half()
    bias = torch.randn(7).half()
    lay = gemv_layout.build_layout(p)
    for uc, upt in ((16, 4), (8, 4), (16, 1)):
        for pipe in (False, True):
            y = torch.full((1, 7), float("nan"), dtype=torch.float16)
            gemv_layout.launch(x, p, lay, bias, y, unit_codes=uc, units_per_thread=upt, pipeline=pipe)
            check(y, x, p, bias)


PIPE_SETTINGS = [
    # units per thread, unit codes, register double-buffering, L2 prefetch (compiled only), rows per program
    (4, None, True, 0, 1), (4, None, False, 2, 3), (2, None, True, 2, None), (1, None, True, 4, 2),
    (2, 8, True, 0, 5), (4, 8, False, 0, 1000),
]


@pytest.mark.parametrize("setting", PIPE_SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_v2_pipelined_rows_per_program(setting):
    """The pipelined kernel: one flat loop over the steps of several rows (uneven, empty, a row of several
    steps, a partial last step moved back; the last program short), rows per program 1 … all."""
    upt, uc, reg, pf, rpp = setting
    p = make_packed(41, 16 * 70 + 5, 16, 4, 0.4, special="empty_rows", seed=12)  # K % G != 0, rows ≤ 70 groups
    q = make_packed(9, 16 * 300, 16, 4, 0.2, seed=13)  # rows of ~240 groups: several steps each
    for pk, dt in ((p, torch.float16), (q, torch.bfloat16)):
        n, k = pk.shape
        lay = gemv_layout.build_layout(pk)
        gen = torch.Generator().manual_seed(14)
        x = torch.randn(1, k, generator=gen).to(dt)
        bias = torch.randn(n, generator=gen).to(dt)
        y = torch.full((1, n), float("nan"), dtype=dt)
        gemv_layout.launch(x, pk, lay, bias, y, unit_codes=uc, units_per_thread=upt, pipeline=True,
                           reg_pipeline=reg, prefetch=pf, rows_per_prog=rpp)
        check(y, x, pk, bias)


def test_v2_plan_holds_launch_options():
    p = make_packed(19, 16 * 40, 16, 4, 0.5, seed=15)
    plan = gemv.prepare(p, variant="data", kernel="v2", v2_opts=dict(units_per_thread=1, rows_per_prog=4))
    assert plan.v2_opts == dict(units_per_thread=1, rows_per_prog=4)
    x = torch.randn(1, 16 * 40, generator=torch.Generator().manual_seed(16)).half()
    check(plan(x), x, p)


@pytest.mark.parametrize("case", V2_CASES, ids=lambda c: f"{c[0]}x{c[1]}-G{c[2]}-b{c[3]}-S{c[4]}-{c[5]}-"
                                                          f"{str(c[6])[6:]}-bias{int(c[7])}")
def test_v2_matches_reference(case):
    n, k, g, bits, sp, special, dtype, has_bias = case
    p = make_packed(n, k, g, bits, sp, False, special)
    lay = gemv_layout.build_layout(p)
    assert lay is not None and lay.version == gemv_layout.LAYOUT_VERSION
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    y = torch.full((1, n), float("nan"), dtype=dtype)
    gemv_layout.launch(x, p, lay, bias, y)
    check(y, x, p, bias)
    if case not in V2_CASES[:2]:
        return
    # the same through gqsa_linear and a prepared plan
    check(gemv.gqsa_linear(x, p, bias, variant="data", kernel="v2"), x, p, bias)
    plan = gemv.prepare(p, variant="data", kernel="v2")
    assert plan.layout is not None
    check(plan(x, bias), x, p, bias)


def balanced_packed(n, k, g, keep, seed=0):
    """Like :func:`make_packed`, every row keeping exactly ``keep`` groups (what the row allocation gives)."""
    gen = torch.Generator().manual_seed(seed)
    c = math.ceil(k / g)
    w = torch.randn(n, c, g, generator=gen)
    s, z = quant.minmax_params(w, 4)
    q = quant.quantize(w, s, z, 4)
    mask = torch.zeros(n, c, dtype=torch.bool)
    mask.scatter_(1, torch.rand(n, c, generator=gen).argsort(dim=1)[:, :keep], True)
    return fmt.pack(q, s, z, mask, (n, k), 4, g)


@pytest.mark.parametrize("mrows", [1, 3])
def test_v2_uniform_rows_need_no_row_pointers(mrows):
    """Where every row keeps the same number of groups the layout says so (``keep``) and the kernels compute the
    rows' ends instead of loading the row pointers: the same outputs as with the loads, bit for bit, for both
    kernels, short and long rows, the packed-fp16 dot; uneven or empty layers get ``keep = 0``."""
    assert gemv_layout.build_layout(make_packed(23, 16 * 30, 16, 4, 0.5, seed=1)).keep == 0  # uneven rows
    assert gemv_layout.build_layout(make_packed(23, 16 * 30, 16, 4, 0.5, special="empty")).keep == 0
    gen = torch.Generator().manual_seed(40)
    for n, k, g, keep in ((37, 16 * 30 + 3, 16, 14), (4, 16 * 360, 16, 330), (29, 64 * 12, 64, 7)):
        p = balanced_packed(n, k, g, keep, seed=n)
        lay = gemv_layout.build_layout(p)
        assert lay.keep == keep
        for uniform in (True, False):  # what the launch passes
            call = gemv_layout.V2Call(p, lay, mrows, torch.float16, True, k, n, torch.device("cpu"), uniform=uniform)
            assert call.consts["UNI"] == uniform and call.ints[-1] == (keep if uniform else 0)
        x = torch.randn(mrows, k, generator=gen).half()
        bias = torch.randn(n, generator=gen).half()
        for opts in (dict(pipeline=True), dict(pipeline=False), dict(half_dot=True, pipeline=True)):
            ys = []
            for uniform in (True, False):
                y = torch.full((mrows, n), float("nan"), dtype=torch.float16)
                gemv_layout.launch(x, p, lay, bias, y, uniform=uniform, **opts)
                ys.append(y)
            assert torch.equal(ys[0], ys[1]), (n, k, g, opts)
            check(ys[0], x, p, bias)


def test_v2_layout_words_and_padding():
    p = make_packed(21, 200, 16, 4, 0.5, seed=3)
    lay = gemv_layout.build_layout(p)
    nnz = p.nnz
    assert lay.meta.numel() == max(nnz, gemv_layout.MIN_GROUPS)
    m = lay.meta[:nnz]
    assert torch.equal((m & 0xFFFF) >> 5, p.col_idx.int())  # byte offset col · 2G (G = 16)
    assert torch.equal(m & 0xF, p.zeros.int())
    assert torch.equal(((m >> 16) & 0xFFFF).to(torch.int16).view(torch.float16), p.scales)
    assert torch.equal(lay.codes[: nnz * 2], p.qweight.reshape(-1).view(torch.int32))
    assert not bool(lay.meta[nnz:].any()) and not bool(lay.codes[nnz * 2:].any())


def test_v2_unsupported_layers_fall_back_to_v1():
    fz = make_packed(13, 160, 16, 4, 0.5, float_zeros=True)
    b8 = make_packed(25, 160, 16, 8, 0.5)  # 8-bit zero point does not fit below col·2G at G = 16
    for p in (fz, b8):
        assert gemv_layout.build_layout(p) is None
        plan = gemv.prepare(p, variant="data", kernel="v2")
        assert plan.layout is None
        x = torch.randn(1, 160).half()
        check(plan(x), x, p)
        check(gemv.gqsa_linear(x, p, variant="data", kernel="v2"), x, p)
    big = make_packed(2, 40000, 128, 4, 0.9)  # K above 32768: the byte offset needs more than 16 bits
    assert not gemv_layout.layout_supported(big)


def check_rows(y, x, p, bias=None):
    """:func:`check` row by row of x (a row stored at another row's place fails)."""
    for i in range(x.shape[0]):
        check(y[i:i + 1], x[i:i + 1], p, bias)


def _spy_kernels(monkeypatch):
    seen = []
    real = gemv_layout.jitted

    def spy(fn, dns=()):
        seen.append(fn.__name__)
        return real(fn, dns)

    monkeypatch.setattr(gemv_layout, "jitted", spy)
    return seen


@pytest.mark.parametrize("m", [2, 3, 4])
def test_v2_batched_matches_reference(m):
    """The v2 kernels at M = 2-4 rows of x (constexpr MB): fp16 and bf16, uneven and empty rows, K % G != 0,
    bias, one long row over several steps (the partial last step moved back), both kernels, y poisoned."""
    p = make_packed(23, 16 * 40 + 5, 16, 4, 0.4, special="empty_rows", seed=21)  # K % G != 0, uneven rows
    q = make_packed(9, 16 * 300, 16, 4, 0.0, special="one_row", seed=22)  # one row of 300 groups
    runs = [(p, torch.float16, True, {}), (p, torch.bfloat16, False, dict(pipeline=False)),
            (q, torch.bfloat16, True, dict(pipeline=True, rows_per_prog=2)), (q, torch.float16, False,
                                                                              dict(pipeline=False))]
    for pk, dt, has_bias, opts in runs:
        n, k = pk.shape
        gen = torch.Generator().manual_seed(23 + m)
        x = torch.randn(m, k, generator=gen).to(dt)
        bias = torch.randn(n, generator=gen).to(dt) if has_bias else None
        y = torch.full((m, n), float("nan"), dtype=dt)
        gemv_layout.launch(x, pk, gemv_layout.build_layout(pk), bias, y, **opts)
        check_rows(y, x, pk, bias)


def test_v2_batched_x_layouts_chunks_and_empty_layer():
    """Rows of x further apart than K (no copy), misaligned rows (copied), M = 5 (a launch of 4 rows and one
    of 1), an empty layer, the packed-fp16 dot at M = 2."""
    p = make_packed(13, 16 * 40, 16, 4, 0.5, seed=24)
    lay = gemv_layout.build_layout(p)
    gen = torch.Generator().manual_seed(25)
    base = torch.randn(3, 16 * 40 + 24, generator=gen).half()
    for x in (base[:, :640], base[:, 3:643], torch.randn(5, 640, generator=gen).half()):
        y = torch.full((x.shape[0], 13), float("nan"), dtype=torch.float16)
        gemv_layout.launch(x, p, lay, None, y)
        check_rows(y, x, p)
    x2 = torch.randn(2, 640, generator=gen).half()
    y = torch.full((2, 13), float("nan"), dtype=torch.float16)
    gemv_layout.launch(x2, p, lay, None, y, half_dot=True)  # (interpreted: the plain path)
    check_rows(y, x2, p)
    e = make_packed(7, 16 * 10, 16, 4, 0.0, special="empty")
    bias = torch.randn(7, generator=gen).half()
    y = torch.full((3, 7), float("nan"), dtype=torch.float16)
    gemv_layout.launch(x2[:, :160].repeat(2, 1)[:3], e, gemv_layout.build_layout(e), bias, y)
    assert torch.equal(y, bias.expand(3, 7))


def test_v2_runs_up_to_v2_max_batch_then_v1(monkeypatch):
    """A plan and gqsa_linear: v2 (the pipelined kernel at M > 1) up to gemv.V2_MAX_BATCH rows, v1 above."""
    seen = _spy_kernels(monkeypatch)
    p = make_packed(3, 16 * 500, 16, 4, 0.3, seed=9)  # long rows: M = 1 runs the one-program-per-row kernel
    assert p.nnz >= gemv_layout.LONG_ROW_GROUPS * 3
    plan = gemv.prepare(p, variant="data", kernel="v2")
    gen = torch.Generator().manual_seed(26)
    x = torch.randn(gemv.V2_MAX_BATCH + 1, 16 * 500, generator=gen).half()
    bias = torch.randn(3, generator=gen).half()
    check(plan(x[:1], bias), x[:1], p, bias)
    assert seen[-1] == "_gemv2_kernel"
    for m in (3, gemv.V2_MAX_BATCH):
        del seen[:]
        check_rows(plan(x[:m], bias), x[:m], p, bias)
        assert seen == ["_gemv2p_kernel"]
        del seen[:]
        check_rows(gemv.gqsa_linear(x[:m], p, bias, variant="data", kernel="v2"), x[:m], p, bias)
        assert seen == ["_gemv2p_kernel"]
    del seen[:]
    check_rows(plan(x), x, p)
    assert not seen  # v1
    with pytest.raises(ValueError, match="kernel"):
        gemv.gqsa_linear(x, p, kernel="v3")


def test_v2_batched_compiled_carries_one_accumulator_per_row(monkeypatch):
    """Compiled (sm_90, offline) at MB = 3: the loop carries 3 accumulators and each sum is stored for the 3
    rows of x, in the loop and after it."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception:  # pragma: no cover - triton without the compiler API
        pytest.skip("no offline compiler")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    consts = gemv_layout.kernel_constexprs(G=16, BITS=4, UPT=2, ASM=True, NUM_THREADS=32, REG=True, PF=2,
                                           HAS_BIAS=True, MB=3)
    args, types, div16 = gemv_layout.sass_signature(consts, pipe=True)
    sig = dict(zip(args, types)) | {k: "constexpr" for k in consts}
    src = ASTSource(fn=triton.jit(gemv_layout._gemv2p_kernel), signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    try:
        ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1)).asm["ttir"]
    except Exception as e:  # pragma: no cover - no CUDA backend / ptxas here
        pytest.skip(f"offline sm_90 compile unavailable: {e}")
    lines = ttir.split("\n")
    cond = next(line for line in lines if "scf.condition" in line)
    assert cond.split(" : ")[-1].count("tensor<32xf32>") >= 3
    yld = next(i for i, line in enumerate(lines) if "scf.yield" in line and "tensor<32xf32>" in line)
    stores = [i for i, line in enumerate(lines) if "tt.store" in line]
    assert len(stores) == 6 and sum(i < yld for i in stores) == 3
    assert sum("tt.addptr %y_ptr, %YS" in line for line in lines) == 2  # row 1 of x: y_ptr + YS


def test_kernel_auto_picks_v2_for_w4_layers():
    long_rows = make_packed(3, 16 * 700, 16, 4, 0.3, seed=9)  # ~490 kept groups per row
    short_rows = make_packed(9, 16 * 300, 16, 4, 0.3, seed=9)  # ~210
    g64 = make_packed(5, 64 * 40, 64, 4, 0.3, seed=9)
    g128 = make_packed(4, 128 * 20, 128, 4, 0.0, seed=9)  # also what 3-bit layers run as (gemv.kernel_packed)
    g32 = make_packed(3, 32 * 700, 32, 4, 0.3, seed=9)
    b2 = make_packed(9, 16 * 300, 16, 2, 0.3, seed=9)
    assert gemv.resolve_kernel(long_rows, "auto") == "v2"
    assert gemv.resolve_kernel(short_rows, "auto") == "v2"
    assert gemv.resolve_kernel(g64, "auto") == "v2"
    assert gemv.resolve_kernel(g128, "auto") == "v2"
    assert gemv.resolve_kernel(g32, "auto") == "v2"
    assert gemv.resolve_kernel(b2, "auto") == "v1"  # measured at 4 bits only
    assert gemv.resolve_kernel(b2, "v2") == "v2"
    for p in (long_rows, short_rows, g64, g128, g32):
        plan = gemv.prepare(p, variant="data", kernel="auto")
        assert plan.kernel == "v2" and plan.layout is not None and plan.v2_opts == {}
        x = torch.randn(1, p.shape[1], generator=torch.Generator().manual_seed(4)).half()
        check(plan(x), x, p)


def test_v2_launch_defaults_pick_the_kernel_by_row_length(monkeypatch):
    """Long rows: the one-program-per-row kernel; short rows: the pipelined kernel, one row per program."""
    seen = _spy_kernels(monkeypatch)
    long_rows = make_packed(3, 16 * 700, 16, 4, 0.3, seed=9)
    short_rows = make_packed(9, 16 * 300, 16, 4, 0.3, seed=9)
    for p, want in ((long_rows, "_gemv2_kernel"), (short_rows, "_gemv2p_kernel")):
        assert (p.nnz >= gemv_layout.LONG_ROW_GROUPS * p.shape[0]) == (want == "_gemv2_kernel")
        x = torch.randn(1, p.shape[1], generator=torch.Generator().manual_seed(4)).half()
        y = torch.full((1, p.shape[0]), float("nan"), dtype=torch.float16)
        gemv_layout.launch(x, p, gemv_layout.build_layout(p), None, y)
        check(y, x, p)
        assert seen[-1] == want


def test_v2_cached_layout_holds_no_weight_view():
    p = make_packed(40, 16 * 300, 16, 4, 0.3, seed=11)  # nnz ≥ MIN_GROUPS: codes are a view of qweight
    assert p.nnz >= gemv_layout.MIN_GROUPS
    a = gemv_layout.cached_layout(p)
    assert a.codes.data_ptr() == p.qweight.data_ptr()
    memo = gemv_layout._LAYOUT_CACHE[id(p.qweight)][2]
    assert memo.codes is None and memo.meta is a.meta
    b = gemv_layout.cached_layout(p)
    assert b.meta is a.meta and b.codes.data_ptr() == p.qweight.data_ptr()
    p.scales.mul_(2)  # an in-place change rebuilds it
    assert gemv_layout.cached_layout(p).meta is not a.meta


def _skip_unless_no_backend(e):
    """Skip an offline-compile test where this machine cannot compile for sm_90 — but not where Triton refused the
    kernel itself (its front end: a function it cannot call, a global it cannot take)."""
    if "Unsupported function referenced" in str(e) or type(e).__name__ == "CompilationError":
        raise e
    pytest.skip(f"offline sm_90 compile unavailable: {e}")


def test_v2_pipelined_compiled_stores_follow_the_loop(monkeypatch):
    """Compiled (sm_90, offline: no GPU) the pipelined kernel must address its outputs from the loop's row
    counter. Regression: a `pr = r` "previous row" variable was not loop-carried by Triton's compiler (its
    loop-entry value was the same object as r's), so every multi-row program stored all its sums at its
    first row — right under the interpreter, wrong on the GPU."""
    import re

    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception:  # pragma: no cover - triton without the compiler API
        pytest.skip("no offline compiler")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # this test compiles (the module's fixture interprets)
    for reg, pf, half in ((True, 2, False), (False, 0, True)):
        consts = gemv_layout.kernel_constexprs(G=16, BITS=4, UPT=4, ASM=True, NUM_THREADS=32, REG=reg, PF=pf,
                                               HALF=half, HAS_BIAS=True)
        args, types, div16 = gemv_layout.sass_signature(consts, pipe=True)
        sig = dict(zip(args, types)) | {k: "constexpr" for k in consts}
        src = ASTSource(fn=triton.jit(gemv_layout._gemv2p_kernel), signature=sig, constexprs=consts,
                        attrs={(i,): [["tt.divisibility", 16]] for i in div16})
        try:
            ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1)).asm["ttir"]
        except Exception as e:  # pragma: no cover - no CUDA backend / ptxas here
            _skip_unless_no_backend(e)
        lines = ttir.split("\n")
        w = next(i for i, line in enumerate(lines) if "scf.while" in line)
        before = {m.group(1) for line in lines[:w] for m in [re.match(r"\s*(%[\w.]+)(?::\d+)? = ", line)] if m}
        for ptr in ("%y_ptr", "%bias_ptr"):
            offs = [m.group(1) for line in lines for m in [re.search(ptr + r", (%[\w.#]+)", line)] if m]
            assert len(offs) == 2, (ptr, offs)  # one inside the loop, one after it
            assert not set(offs) & before, f"{ptr} addressed by a value fixed before the loop: {offs}"


def _hd_rows_kernel(x_ptr, cw_ptr, meta_ptr, rp_ptr, y_ptr, G: tl.constexpr, UC: tl.constexpr,
                    NUM_THREADS: tl.constexpr, one):
    r = tl.program_id(0)
    tl.store(y_ptr + r, gemv_layout._hd_row_fp32(x_ptr, cw_ptr, meta_ptr, rp_ptr, r, G, UC, NUM_THREADS, one))


def _overflow_case(g):
    """A W4 layer with empty rows and activations at ±65504 (every fifth one at up to ±30000): fp16 lane sums of
    8 products overflow in most rows. Returns the layer, its v2 layout and x."""
    p = make_packed(23, g * 37, g, 4, 0.4, special="empty_rows", seed=31)
    k = p.shape[1]
    gen = torch.Generator().manual_seed(32)
    x = (65504.0 * torch.sign(torch.randn(1, k, generator=gen))).half()
    x[0, ::5] = (torch.randn(len(range(0, k, 5)), generator=gen) * 30000).clamp(-65504, 65504).half()
    return p, gemv_layout.build_layout(p), x


@pytest.mark.parametrize("g", [16, 64])
def test_v2_half_dot_fp32_row_redo(g):
    """The packed-fp16 dot's fp32 redo of a row (gemv_layout._hd_row_fp32, what the compiled half-dot kernel runs
    for a row whose sum came out inf/NaN), interpreted: activations up to the fp16 maximum (lane sums of 8
    products would overflow in fp16) give the fp32 result; a NaN activation gives NaN in the rows that keep it."""
    from gqsa.kernels.jit import jitted

    p, lay, x = _overflow_case(g)
    n = p.shape[0]
    ker = jitted(_hd_rows_kernel)
    rows = torch.repeat_interleave(torch.arange(n), p.row_ptr.diff().long())
    keeps3 = torch.zeros(n, dtype=torch.bool).index_fill_(0, rows[p.col_idx.long() == 3], True)
    for xx, bad in ((x, torch.zeros(n, dtype=torch.bool)),
                    (x.clone().index_fill_(1, torch.tensor([g * 3 + 1]), float("nan")), keeps3)):
        y = torch.full((n,), float("nan"), dtype=torch.float32)
        ker[(n,)](xx.reshape(-1).view(torch.int32), lay.codes, lay.meta, p.row_ptr, y, G=g, UC=16, NUM_THREADS=32,
                  one=1)
        ref = reference.linear(xx.float().nan_to_num(0.0), p)[0]  # (dense: a NaN would reach every row)
        assert torch.equal(y.isnan(), bad)
        err = float((y[~bad] - ref[~bad]).norm() / ref[~bad].norm())
        assert err < 1e-6, err
    assert bool(bad.any()) and not bool(bad.all())


@pytest.mark.parametrize("g", [16, 64])
def test_v2_half_dot_compiled_redoes_overflowed_rows(monkeypatch, g):
    """Compiled (sm_90, offline) the packed-fp16 dot must hold its fp32 redo: the row's sum tested against the fp32
    maximum (false for inf and NaN), and under it the redo's loops, reading fp16 activations into fp32 (which the
    half dot's hot path never does: its dot and metadata decode are inline PTX), at both places a row's sum goes
    out. The fp32-dot build has neither. Regression: the half dot's fp16 lane sums overflowed to inf for |x| above
    ≈ 8700 with no fallback."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception:  # pragma: no cover - triton without the compiler API
        pytest.skip("no offline compiler")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ttirs = {}
    for half in (True, False):
        consts = gemv_layout.kernel_constexprs(G=g, BITS=4, UPT=4, ASM=True, NUM_THREADS=32, REG=True, PF=2,
                                               HALF=half)
        args, types, div16 = gemv_layout.sass_signature(consts, pipe=True)
        sig = dict(zip(args, types)) | {k: "constexpr" for k in consts}
        src = ASTSource(fn=triton.jit(gemv_layout._gemv2p_kernel), signature=sig, constexprs=consts,
                        attrs={(i,): [["tt.divisibility", 16]] for i in div16})
        try:
            ttirs[half] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                         options=dict(num_warps=1)).asm["ttir"]
        except Exception as e:  # pragma: no cover - no CUDA backend / ptxas here
            _skip_unless_no_backend(e)
    for half, ttir in ttirs.items():
        n_while = ttir.count("scf.while")
        n_ext = sum("arith.extf" in line and "f16> to tensor<32xf32>" in line for line in ttir.split("\n"))
        n_max = ttir.count("3.40282347E+38")
        if half:
            # the main loop and a redo loop at each place a row's sum goes out, each converting the 16 activations
            # of a unit (and the scale)
            assert n_while == 3 and n_max >= 1 and n_ext >= 2 * 16, (n_while, n_max, n_ext)
        else:
            assert n_while == 1 and n_max == 0, (n_while, n_max)


def _half_dot_emulated(x, p):
    """The packed-fp16 dot (gemv_layout._PTX_HDOT16, any G of whole 16-code units) emulated in torch, per output row
    in float64 (before the output's rounding): per unit of 16 codes, d = (q − z)/16 exactly in fp16; the even and
    the odd codes each a lane: the first product rounded to fp16, then 7 fp16 fmas (an fp32 sum rounded to fp16,
    as the kernel's interpreted path does); the two lanes added in fp32, times the scale, summed, × 16. A lane that
    overflows gives inf (a row's sum inf or NaN). ``x``: [K] fp16."""
    n = p.shape[0]
    g = p.group_size
    rows = torch.repeat_interleave(torch.arange(n), p.row_ptr.diff().long())
    b = p.qweight.reshape(p.nnz, g // 2).long()
    q = torch.stack((b & 0xF, b >> 4), -1).reshape(p.nnz, g).float()  # code 2i: low nibble of byte i
    d = ((q - p.zeros.float()[:, None]) / 16).half().float().reshape(p.nnz, g // 16, 16)
    xg = x.float().reshape(-1, g)[p.col_idx.long()].reshape(p.nnz, g // 16, 16)
    lanes = []
    for par in (0, 1):
        a = (xg[..., par] * d[..., par]).half().float()
        for e in range(1, 8):
            a = (xg[..., par + 2 * e] * d[..., par + 2 * e] + a).half().float()
        lanes.append(a)
    units = (lanes[0] + lanes[1]).double()  # [nnz, G/16]
    per_group = units.sum(1) * p.scales.double()
    return torch.zeros(n, dtype=torch.float64).index_add_(0, rows, per_group) * 16


@pytest.mark.parametrize("g", [16, 32, 64, 128])
def test_v2_half_dot_interpreted_matches_emulation(g):
    """The packed-fp16 dot of the pipelined kernel, interpreted (plain-Triton twin of the PTX: _hd_meta_emu,
    _hdot16_emu) on W4 G16 / G32 / G64 / G128 layers (units of 16 codes; G64: four units of one metadata word), rows of
    several steps, empty rows, rows per program 1 and 3, 1 and 2 units per thread: equal to the torch emulation of
    the half dot to fp32 summation order, and off the exact dot by the half dot's own error (activations of
    ~±2000: fp16 lane sums round at ulp 2-4), which the fp32 dot (half_dot=False) does not have."""
    p = make_packed(19, g * 45, g, 4, 0.3, special="empty_rows", seed=50 + g)
    n, k = p.shape
    lay = gemv_layout.build_layout(p)
    x = (torch.randn(1, k, generator=torch.Generator().manual_seed(51)) * 2000).half()
    emu = _half_dot_emulated(x[0], p)
    exact = (x.double() @ reference.dequantize(p, torch.float64).T)[0]
    scale = float(exact.norm())
    assert float((emu - exact).norm()) / scale > 1e-4  # the case tells the two dots apart
    for upt, rpp in ((2, 3), (1, 1)):
        y = torch.full((1, n), float("nan"), dtype=torch.float32)
        gemv_layout.launch(x, p, lay, None, y, pipeline=True, units_per_thread=upt, rows_per_prog=rpp,
                           half_dot=True)
        assert bool(torch.isfinite(y).all())
        e_emu = float((y[0].double() - emu).norm()) / scale
        assert e_emu < 2e-6, (upt, rpp, e_emu)
    y = torch.full((1, n), float("nan"), dtype=torch.float32)
    gemv_layout.launch(x, p, lay, None, y, pipeline=True, rows_per_prog=3, half_dot=False)
    assert float((y[0].double() - exact).norm()) / scale < 2e-6


@pytest.mark.parametrize("g", [16, 64])
def test_v2_half_dot_interpreted_overflow_redo(g):
    """The interpreted half dot with activations up to the fp16 maximum (±65504, some ±30000: fp16 lane sums
    overflow in most rows) and with a NaN activation: rows whose half-dot sum is not finite are redone in fp32
    (_hd_row_fp32) at both places a row's sum goes out (inside the loop and after it: one and three rows per
    program; without the redo they come out inf/NaN), the others keep the half dot's result or are redone too;
    NaN exactly in the rows that keep the NaN's group."""
    p, lay, x = _overflow_case(g)
    n = p.shape[0]
    rows = torch.repeat_interleave(torch.arange(n), p.row_ptr.diff().long())
    keeps3 = torch.zeros(n, dtype=torch.bool).index_fill_(0, rows[p.col_idx.long() == 3], True)
    xnan = x.clone().index_fill_(1, torch.tensor([g * 3 + 1]), float("nan"))
    for xx, bad in ((x, torch.zeros(n, dtype=torch.bool)), (xnan, keeps3)):
        emu = _half_dot_emulated(xx[0], p)
        exact = reference.linear(xx.float().nan_to_num(0.0), p)[0].double()
        ok = ~bad
        over = ~torch.isfinite(emu) & ok  # rows whose own half-dot lanes overflow
        assert int(over.sum()) >= (1 if bool(bad.any()) else n // 3), int(over.sum())
        sc = float(exact[ok].abs().max())
        for rpp in (1, 3):
            y = torch.full((1, n), float("nan"), dtype=torch.float32)
            gemv_layout.launch(xx, p, lay, None, y, pipeline=True, units_per_thread=2, rows_per_prog=rpp,
                               half_dot=True)
            assert torch.equal(y[0].isnan(), bad), rpp
            d_ex = (y[0].double() - exact).abs() / sc
            d_emu = ((y[0].double() - emu).abs() / sc).nan_to_num(float("inf"))
            # an overflowed row is redone in fp32; another row keeps the half dot's sum, or is redone too where
            # its last step, moved back over a neighbouring row's groups (scale 0), met an inf there (inf · 0)
            assert float(d_ex[over].max()) < 1e-5, rpp
            assert float(torch.minimum(d_ex, d_emu)[ok].max()) < 1e-5, rpp


def test_v2_half_dot_default_policy():
    """launch's default (half_dot=None) takes the packed-fp16 dot for one row of fp16 x on a W4 G16 layer of
    ≥ HALF_MIN_CODES kept codes (kept groups · G) or a G32 / G64 / G128 layer of ≥ HALF_WIDE_MIN_CODES, and for 2 …
    HALF_WIDE_BATCH_MAX_M rows on G64 / G128 layers of any size (where it measured faster), compiled only; never
    under the interpreter. Its units per thread (half_dot_units): at one row G16 4 (and maxnreg) from
    HALF_U4_MIN_CODES kept codes, wider groups where the rows average ≥ HALF_WIDE_U4_ROW_CODES; at several rows
    HALF_UNITS_PER_THREAD."""
    import dataclasses

    def layer(g, groups, n=2):  # (only the count of kept groups and the rows are read: a col_idx of that many)
        p = make_packed(2, g * 8, g, 4, 0.0, seed=40)
        return dataclasses.replace(p, col_idx=torch.zeros(groups, dtype=torch.int16), shape=(n, g * 8))

    need, wide = gemv_layout.HALF_MIN_CODES, gemv_layout.HALF_WIDE_MIN_CODES
    big, small = layer(16, need // 16), layer(16, need // 16 - 1)
    want = gemv_layout.HALF_DOT_DEFAULT != "0"
    assert gemv_layout.half_dot_default(big, torch.float16, 1) == want
    for g in (32, 64, 128):
        assert gemv_layout.half_dot_default(layer(g, wide // g), torch.float16, 1) == want
    if gemv_layout.HALF_DOT_DEFAULT == "auto":
        assert not gemv_layout.half_dot_default(small, torch.float16, 1)
        for g in (32, 64, 128):
            assert not gemv_layout.half_dot_default(layer(g, wide // g - 1), torch.float16, 1)
        mx = gemv_layout.HALF_WIDE_BATCH_MAX_M
        for g in (16, 32, 64, 128):  # several rows: G64 / G128 of any size, up to HALF_WIDE_BATCH_MAX_M rows
            wide_batch = g in gemv_layout.HALF_WIDE_BATCH_GROUPS
            assert [gemv_layout.half_dot_default(layer(g, 4), torch.float16, m) for m in (2, mx, mx + 1)] \
                == [wide_batch, wide_batch, False], g
            assert not gemv_layout.half_dot_default(layer(g, 4), torch.bfloat16, 2)
            assert not gemv_layout.half_dot_default(layer(g, 4), torch.float16, 2, num_warps=2)
        assert not gemv_layout.half_dot_default(big, torch.float16, 2)
        assert not gemv_layout.half_dot_default(big, torch.float16, 1, num_warps=2)
    assert not gemv_layout.half_dot_default(big, torch.bfloat16, 1)
    assert not gemv_layout.half_dot_default(layer(64, need // 64), torch.bfloat16, 1)
    assert not gemv_layout.half_dot_default(big, torch.float16, 1, unit_codes=8)
    u4 = (4, gemv_layout.HALF_MAXNREG)
    u2 = (gemv_layout.HALF_UNITS_PER_THREAD, None)
    n16 = gemv_layout.HALF_U4_MIN_CODES // 16
    assert gemv_layout.half_dot_units(layer(16, n16, n=100000), mrows=2) == u2
    assert gemv_layout.half_dot_units(layer(16, n16, n=100000)) == u4
    assert gemv_layout.half_dot_units(layer(16, n16 - 1, n=10)) == u2
    row = gemv_layout.HALF_WIDE_U4_ROW_CODES
    for g, n in ((64, 4096), (32, 28672), (128, 4096)):  # rows of just enough kept codes, and one code fewer
        assert gemv_layout.half_dot_units(layer(g, n * row // g, n=n)) == u4
        assert gemv_layout.half_dot_units(layer(g, n * row // g - 1, n=n)) == u2


def test_plan_prepared_v2_calls_per_batch_shape():
    """``LinearPlan`` keeps one v2 launch (``gemv_layout.V2Call``) per batch shape of the GEMV path: the same
    shapes again run it, right every time, with and without a bias; x off 16-byte alignment on a prepared
    shape is copied first; a layer whose K is not whole groups gets no prepared call (x is padded each time)."""
    from gqsa.kernels import dispatch

    p = make_packed(37, 256, 16, 4, 0.5)
    plan = dispatch.LinearPlan(p)
    bias = torch.randn(37).half()
    for m in (1, 3):
        for b in (None, bias):
            for _ in range(2):
                x = torch.randn(1, m, 256).half()
                y = plan(x, b)
                assert y.shape == (1, m, 37)
                check_rows(y[0], x[0], p, b)
    assert len(plan._calls) == 4 and all(isinstance(c, gemv_layout.V2Call) for c in plan._calls.values())
    for m in (1, 3):  # the prepared shapes, x 2 bytes off alignment
        x = torch.randn(m * 256 + 1).half()[1:].view(1, m, 256)
        assert x.data_ptr() % 16
        y = plan(x, bias)
        check_rows(y[0], x[0], p, bias)
    assert len(plan._calls) == 4
    odd = dispatch.LinearPlan(make_packed(20, 200, 16, 4, 0.5))  # K % G != 0
    x = torch.randn(2, 200).half()
    check_rows(odd(x), x, odd.packed)
    assert odd._calls == {}
