"""BatchNorm backward on the GPU path (issue 6), run on the CUDA emulator.

kernels/batch_norm_backward.cu through ``planner.plan_batch_norm_backward`` and the emulator
launcher, against the float64 oracle (tests/oracle_backward.py): every float dtype of x with
float32 / float64 (and 16-bit) parameters, (N, C), NCL, NCHW and odd shapes, one and many blocks
per channel, misaligned views, every output mask, eval mode; bitwise repeatability across
emulator schedules; and ``cupybn.native`` on the emulated GPU path against its CPU path.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

import oracle_backward  # noqa: E402
from cupybn._cuda import planner  # noqa: E402
from test_cuda_batch_norm_eval import EPS, alloc, alloc_empty, get_launcher, quantize, to_float64  # noqa: E402
from test_cuda_batch_norm_train import _to_emulator, emulated_gpu  # noqa: E402,F401

pytestmark = pytest.mark.emulator

SOURCE = "batch_norm_backward.cu"


def acc_of(dtype):
    return np.float64 if dtype == "float64" else np.float32


def op(a, dtype):
    return planner.Operand.of(a, dtype if dtype == "bfloat16" else None)


def make_data(shape, x_dtype, p_dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    _, x = quantize(rng.standard_normal(shape) * 2.0 + 0.75, x_dtype)
    _, dy = quantize(rng.standard_normal(shape), x_dtype)
    _, w = quantize(rng.standard_normal(c), p_dtype)
    _, rm = quantize(rng.standard_normal(c) * 0.5, p_dtype)
    _, rv = quantize(rng.uniform(0.25, 4.0, c), p_dtype)
    return x, dy, w, rm, rv


def run_backward(launcher, shape, x_dtype, p_dtype, *, train=True, mask=(True, True, True), use_weight=True,
                 offsets=(0, 0, 0), splits=None, threads=None, seed=0, eps=1e-5):
    """One backward on the emulator: returns ((dx, gw, gb) as float64 or None, data, plan)."""
    mod = launcher.module(SOURCE)
    x, dy, w, rm, rv = data = make_data(shape, x_dtype, p_dtype, seed)
    acc = acc_of(x_dtype)
    c = shape[1]
    axes = (0,) + tuple(range(2, len(shape)))
    if train:  # saved statistics as the forward leaves them: accumulation dtype
        mean = x.mean(axis=axes)
        invstd = 1.0 / np.sqrt(((x - mean.reshape((1, -1) + (1,) * (len(shape) - 2))) ** 2).mean(axis=axes) + eps)
        s_dtype = planner.accumulation_dtype(x_dtype)
        stats = (mean.astype(acc), invstd.astype(acc))
    else:
        s_dtype = p_dtype
        stats = (rm, rv)
    mean_buf = alloc(mod, stats[0], s_dtype)
    stat_buf = alloc(mod, stats[1], s_dtype)
    g_buf = alloc(mod, dy, x_dtype, offsets[0])
    x_buf = alloc(mod, x, x_dtype, offsets[1])
    dx_buf = alloc_empty(mod, shape, x_dtype, offsets[2]) if mask[0] else None
    w_buf = alloc(mod, w, p_dtype) if use_weight else None
    grad_dtype = p_dtype if use_weight else x_dtype
    gw_buf = alloc_empty(mod, (c,), grad_dtype) if mask[1] else None
    gb_buf = alloc_empty(mod, (c,), grad_dtype) if mask[2] else None
    sums = alloc_empty(mod, (3 * c,), planner.accumulation_dtype(x_dtype))
    plan = planner.plan_batch_norm_backward(
        op(g_buf, x_dtype), op(x_buf, x_dtype), None if dx_buf is None else op(dx_buf, x_dtype),
        op(mean_buf, s_dtype), op(stat_buf, s_dtype), train, None if w_buf is None else op(w_buf, p_dtype),
        None if gw_buf is None else op(gw_buf, grad_dtype), None if gb_buf is None else op(gb_buf, grad_dtype),
        op(sums, planner.accumulation_dtype(x_dtype)), eps, device=launcher.device_info(), splits=splits,
        threads=threads)
    launcher.launch(plan)
    out = tuple(None if b is None else to_float64(b, d)
                for b, d in ((dx_buf, x_dtype), (gw_buf, grad_dtype), (gb_buf, grad_dtype)))
    return out, data, plan


def check_against_oracle(out, data, shape, x_dtype, grad_dtype, *, train=True, use_weight=True, eps=1e-5):
    x, dy, w, rm, rv = data
    rdx, rdw, rdb = oracle_backward.batch_norm_backward(dy, x, w if use_weight else None, training=train,
                                                        running_mean=rm, running_var=rv, eps=eps)
    u = 2.0**-52 if x_dtype == "float64" else 2.0**-23
    n = x.size // shape[1]
    axes = (0,) + tuple(range(2, len(shape)))
    bc = (1, -1) + (1,) * (len(shape) - 2)
    # dx: output rounding, plus the accumulation dtype's error on the terms (sums of n values)
    scale = np.abs(rdx).max(axis=axes).reshape(bc) + np.abs(dy).max(axis=axes).reshape(bc)
    if use_weight:
        scale = scale * np.maximum(1.0, np.abs(w).reshape(bc))
    if out[0] is not None:
        tol = EPS[x_dtype] * np.abs(rdx) + 64 * u * np.sqrt(n) * scale * 4
        err = np.abs(out[0] - rdx)
        assert (err <= tol).all(), f"dx: max error {err.max()} (tolerance {tol.min()})"
    mag = np.abs(dy).sum(axis=axes) * (1.0 + np.abs(x).max() * 4)
    for got, ref, what in ((out[1], rdw, "grad_weight"), (out[2], rdb, "grad_bias")):
        if got is None:
            continue
        tol = EPS[grad_dtype] * np.abs(ref) + 64 * u * mag + 1e-300
        err = np.abs(got - ref)
        assert (err <= tol).all(), f"{what}: error {err}, tolerance {tol}"


CASES = [
    ((6, 5), "float32", "float32"),
    ((4, 3, 37), "float16", "float32"),
    ((3, 4, 5, 7), "bfloat16", "float32"),
    ((2, 3, 9, 5), "float64", "float64"),
    ((2, 3, 9, 5), "float64", "float32"),
    ((5, 3, 33), "float32", "float64"),
    ((3, 2, 3, 3, 5), "float16", "float16"),
    ((7, 6, 1, 11), "bfloat16", "bfloat16"),
]


@pytest.mark.parametrize("shape,x_dtype,p_dtype", CASES)
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_training_backward_matches_the_oracle(shape, x_dtype, p_dtype, blocks):
    launcher = get_launcher(sm_count=2)
    kw = dict(splits=1) if blocks == "one" else dict(splits=4, threads=32)
    out, data, plan = run_backward(launcher, shape, x_dtype, p_dtype, **kw)
    assert len(plan) == 2
    assert plan[0].notes["splits"] == (1 if blocks == "one" else 4)
    check_against_oracle(out, data, shape, x_dtype, p_dtype)


@pytest.mark.parametrize("shape,x_dtype,p_dtype", CASES[:4])
def test_eval_backward_matches_the_oracle(shape, x_dtype, p_dtype):
    launcher = get_launcher(sm_count=2)
    out, data, plan = run_backward(launcher, shape, x_dtype, p_dtype, train=False, splits=3, threads=32)
    assert len(plan) == 2
    check_against_oracle(out, data, shape, x_dtype, p_dtype, train=False)
    # dx only: one launch, dy read once, x not at all
    out2, _, plan2 = run_backward(launcher, shape, x_dtype, p_dtype, train=False, mask=(True, False, False))
    assert len(plan2) == 1 and plan2[0].kernel.startswith("cupybn::batch_norm_backward_dx")
    np.testing.assert_array_equal(out2[0], out[0])


@pytest.mark.parametrize("x_dtype", ["float16", "float32", "float64"])
def test_misaligned_views(x_dtype):
    launcher = get_launcher(sm_count=2)
    shape = (3, 4, 17)
    ref, _, _ = run_backward(launcher, shape, x_dtype, "float32", splits=2, threads=32)
    for offsets in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 3, 5)):
        out, data, _ = run_backward(launcher, shape, x_dtype, "float32", offsets=offsets, splits=2, threads=32)
        check_against_oracle(out, data, shape, x_dtype, "float32")
        for a, b in zip(out, ref):
            np.testing.assert_array_equal(a, b)  # alignment changes the access width, never the result


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)))
def test_output_masks(mask, train):
    launcher = get_launcher(sm_count=2)
    shape = (4, 3, 10)
    out, data, plan = run_backward(launcher, shape, "float32", "float32", train=train, mask=mask)
    for got, asked in zip(out, mask):
        assert (got is None) == (not asked)
    reduce = mask[1] or mask[2] or (train and mask[0])
    assert len(plan) == int(reduce) + int(mask[0])
    check_against_oracle(out, data, shape, "float32", "float32", train=train)


def test_no_weight_gives_gradients_in_the_input_dtype():
    launcher = get_launcher(sm_count=2)
    shape = (5, 3, 8)
    out, data, _ = run_backward(launcher, shape, "float16", "float32", use_weight=False)
    check_against_oracle(out, data, shape, "float16", "float16", use_weight=False)


@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32"])
def test_bitwise_repeatable_across_schedules(x_dtype):
    shape = (6, 3, 41)
    results = []
    for seed in (0, 3, 11, 12345):
        out, _, _ = run_backward(get_launcher(sm_count=2, seed=seed), shape, x_dtype, "float32", splits=5,
                                 threads=32, seed=7)
        results.append(out)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_counters_are_left_at_zero():
    launcher = get_launcher(sm_count=2)
    run_backward(launcher, (4, 3, 50), "float32", "float32", splits=6, threads=32)
    assert not np.asarray(launcher.counters).any()


def test_planner_rejects_what_it_has_no_kernel_for():
    x = planner.Operand(None, (2, 3, 4), (12, 4, 1), "float32")
    st = planner.Operand(None, (3,), (1,), "float16")
    w = planner.Operand(None, (3,), (1,), "float64")
    with pytest.raises(TypeError, match="no backward kernel"):
        planner.plan_batch_norm_backward(x, x, x, st, st, False, w, None, None, None, 1e-5)
    empty = planner.Operand(None, (0, 3, 4), (12, 4, 1), "float32")
    acc = planner.Operand(None, (3,), (1,), "float32")
    assert planner.plan_batch_norm_backward(empty, empty, empty, acc, acc, True, None, acc, acc, None, 1e-5) == ()


# ------------------------------------------------------------------------------------ native API

@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 9), (2, 3, 5, 6)])
@pytest.mark.parametrize("x_dtype", ["float32", "float64"])
def test_native_api_matches_the_cpu_path(emulated_gpu, shape, x_dtype):
    from cupybn import native

    rng = np.random.default_rng(5)
    c = shape[1]
    p = np.float64 if x_dtype == "float64" else np.float32
    x = (rng.standard_normal(shape) * 2 + 1).astype(x_dtype)
    dy = rng.standard_normal(shape).astype(x_dtype)
    w, b = rng.standard_normal(c).astype(p), rng.standard_normal(c).astype(p)
    rm_c, rv_c = np.zeros(c, p), np.ones(c, p)
    rm_g, rv_g = emulator.array(rm_c), emulator.array(rv_c)
    wg, bg = emulator.array(w), emulator.array(b)
    tol = dict(rtol=1e-5, atol=1e-5) if x_dtype == "float32" else dict(rtol=1e-12, atol=1e-12)

    y_g, m_g, i_g = native.native_batch_norm(emulator.array(x), wg, bg, rm_g, rv_g, True, 0.1, 1e-5)
    y_c, m_c, i_c = native.native_batch_norm(x, w, b, rm_c, rv_c, True, 0.1, 1e-5)
    for g, cc in ((y_g, y_c), (m_g, m_c), (i_g, i_c), (rm_g, rm_c), (rv_g, rv_c)):
        np.testing.assert_allclose(g, cc, **tol)
    assert m_g.dtype == m_c.dtype and i_g.dtype == i_c.dtype

    for mask in ((True, True, True), (True, False, False), (False, True, True)):
        got = native.batch_norm_backward(emulator.array(dy), emulator.array(x), wg, rm_g, rv_g, m_g, i_g, True,
                                         1e-5, mask)
        assert len(emulated_gpu.plans[-1]) == (2 if mask[0] else 1)
        ref = native.batch_norm_backward(dy, x, w, rm_c, rv_c, m_c, i_c, True, 1e-5, mask)
        for g, r in zip(got, ref):
            assert (g is None) == (r is None)
            if g is not None:
                assert g.dtype == r.dtype
                np.testing.assert_allclose(g, r, **tol)

    # eval: empty saved statistics, backward from the running statistics
    y_g, m_g, i_g = native.native_batch_norm(emulator.array(x), wg, bg, rm_g, rv_g, False, 0.1, 1e-5)
    y_c, m_c, i_c = native.native_batch_norm(x, w, b, rm_c, rv_c, False, 0.1, 1e-5)
    np.testing.assert_allclose(y_g, y_c, **tol)
    assert m_g.shape == (0,) and i_g.shape == (0,)
    got = native.batch_norm_backward(emulator.array(dy), emulator.array(x), wg, rm_g, rv_g, m_g, i_g, False,
                                     1e-5, (True, True, True))
    ref = native.batch_norm_backward(dy, x, w, rm_c, rv_c, m_c, i_c, False, 1e-5, (True, True, True))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, **tol)


@pytest.mark.parametrize("blocks", ["one", "many"])
def test_large_mean_uses_the_precise_batch_mean(blocks):
    """float32 channel with mean 1e4 and std 1e-2: save_mean (the batch mean rounded to float32)
    is off by up to ulp(1e4) / 2 = 5e-4 = 0.05 std. The forward normalized with the precise mean
    (save_mean + save_offset); the backward recovers the rest from x and matches float64."""
    launcher = get_launcher(sm_count=2)
    mod = launcher.module(SOURCE)
    shape = (8, 3, 50)
    rng = np.random.default_rng(9)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(x64.var(axis=(0, 2)) + 1e-5)
    c = shape[1]
    dx = alloc_empty(mod, shape, "float32")
    gw, gb = alloc_empty(mod, (c,), "float32"), alloc_empty(mod, (c,), "float32")
    sums = alloc_empty(mod, (3 * c,), "float32")
    ops = [op(alloc(mod, a, "float32"), "float32") for a in (dy, x, mean.astype(np.float32),
                                                             invstd.astype(np.float32))]
    kw = dict(splits=1) if blocks == "one" else dict(splits=4, threads=32)
    plan = planner.plan_batch_norm_backward(ops[0], ops[1], op(dx, "float32"), ops[2], ops[3], True, None,
                                            op(gw, "float32"), op(gb, "float32"), op(sums, "float32"), 1e-5,
                                            device=launcher.device_info(), **kw)
    launcher.launch(plan)
    rdx, rdw, rdb = oracle_backward.batch_norm_backward(dy, x, None, True, eps=1e-5)
    assert np.abs(np.asarray(sums).reshape(c, 3)[:, 2]).max() > 0  # the rest was found and used
    scale = np.abs(rdx).max()
    assert np.abs(dx - rdx).max() <= 2e-3 * scale
    np.testing.assert_allclose(gw, rdw, rtol=0, atol=2e-3 * np.abs(rdw).max())
    np.testing.assert_allclose(gb, rdb, rtol=1e-5, atol=1e-4)


def test_a_foreign_save_mean_is_used_as_given():
    """A save_mean far from the batch mean is not corrected (ATen's semantics)."""
    launcher = get_launcher(sm_count=2)
    mod = launcher.module(SOURCE)
    shape = (4, 2, 6)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    gw = alloc_empty(mod, (c,), "float32")
    sums = alloc_empty(mod, (3 * c,), "float32")
    mean = np.array([0.5, -1.0], np.float32)
    invstd = np.array([2.0, 0.5], np.float32)
    plan = planner.plan_batch_norm_backward(op(alloc(mod, dy, "float32"), "float32"),
                                            op(alloc(mod, x, "float32"), "float32"), None,
                                            op(alloc(mod, mean, "float32"), "float32"),
                                            op(alloc(mod, invstd, "float32"), "float32"), True, None,
                                            op(gw, "float32"), None, None, 1e-5, device=launcher.device_info())
    launcher.launch(plan)
    ref = ((dy.astype(np.float64) * (x - mean.reshape(1, -1, 1))).sum(axis=(0, 2))) * invstd
    np.testing.assert_allclose(gw, ref, rtol=1e-5, atol=1e-5)
