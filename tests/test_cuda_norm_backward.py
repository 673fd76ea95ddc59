"""LayerNorm / GroupNorm / InstanceNorm backward on the GPU path (issue 6), run on the CUDA emulator.

kernels/groups_backward.cu through ``planner.plan_groups_backward`` and the emulator launcher,
against the float64 oracle (tests/oracle_backward.py): every float dtype of x, odd shapes, output
masks, bitwise repeatability across emulator schedules; and ``cupybn.native`` (native forward
statistics + backward) on the emulated GPU path against its CPU path.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

import oracle_backward  # noqa: E402
from cupybn._cuda import planner  # noqa: E402
from test_cuda_batch_norm_eval import EPS, alloc, alloc_empty, get_launcher, quantize, to_float64  # noqa: E402
from test_cuda_batch_norm_train import emulated_gpu  # noqa: E402,F401

pytestmark = pytest.mark.emulator

SOURCE = "groups_backward.cu"


def op(a, dtype):
    return planner.Operand.of(a, dtype if dtype == "bfloat16" else None)


def run(launcher, kind, shape, arg, x_dtype, p_dtype, *, mask=(True, True, True), use_weight=True, seed=0,
        chunks=None, eps=1e-5):
    """One backward on the emulator: ((dx, gw, gb) as float64 or None, (x, dy, w), plan)."""
    mod = launcher.module(SOURCE)
    rng = np.random.default_rng(seed)
    _, x = quantize(rng.standard_normal(shape) * 2.0 + 0.75, x_dtype)
    _, dy = quantize(rng.standard_normal(shape), x_dtype)
    if kind == "layer":
        layout = planner.layer_norm_layout(shape, arg)
        pshape = arg
        grouped = x.reshape(layout.groups, layout.length)
    else:
        layout = planner.group_norm_layout(shape, arg) if kind == "group" else planner.instance_norm_layout(shape)
        pshape = (shape[1],)
        grouped = x.reshape(layout.groups, layout.length)
    _, w = quantize(rng.standard_normal(pshape), p_dtype)
    acc = planner.accumulation_dtype(x_dtype)
    mean = grouped.mean(axis=1)
    rstd = 1.0 / np.sqrt(((grouped - mean[:, None]) ** 2).mean(axis=1) + eps)
    mean_buf = alloc(mod, mean.astype(np.dtype(acc)), acc)
    rstd_buf = alloc(mod, rstd.astype(np.dtype(acc)), acc)
    g_buf, x_buf = alloc(mod, dy, x_dtype), alloc(mod, x, x_dtype)
    dx_buf = alloc_empty(mod, shape, x_dtype) if mask[0] else None
    w_buf = alloc(mod, w, p_dtype) if use_weight else None
    grad_dtype = p_dtype if use_weight else x_dtype
    per = math.prod(pshape)
    gw_buf = alloc_empty(mod, (per,), grad_dtype) if mask[1] else None
    gb_buf = alloc_empty(mod, (per,), grad_dtype) if mask[2] else None
    sums = alloc_empty(mod, (2 * layout.groups,), acc)
    dev = launcher.device_info()
    ws = alloc_empty(mod, (planner.groups_backward_workspace(layout, dev, chunks),), acc)
    plan = planner.plan_groups_backward(
        op(g_buf, x_dtype), op(x_buf, x_dtype), None if dx_buf is None else op(dx_buf, x_dtype), layout,
        op(mean_buf, acc), op(rstd_buf, acc), None if w_buf is None else op(w_buf, p_dtype),
        None if gw_buf is None else op(gw_buf, grad_dtype), None if gb_buf is None else op(gb_buf, grad_dtype),
        op(sums, acc), op(ws, acc), device=dev, chunks=chunks)
    launcher.launch(plan)
    out = tuple(None if b is None else to_float64(b, d)
                for b, d in ((dx_buf, x_dtype), (gw_buf, grad_dtype), (gb_buf, grad_dtype)))
    return out, (x, dy, w if use_weight else None, layout), plan


def check(out, data, kind, arg, x_dtype, grad_dtype, eps=1e-5):
    x, dy, w, layout = data
    if kind == "layer":
        rdx, rdw, rdb = oracle_backward.layer_norm_backward(dy, x, arg, w, eps)
    elif kind == "group":
        rdx, rdw, rdb = oracle_backward.group_norm_backward(dy, x, arg, w, eps)
    else:
        rdx, rdw, rdb = oracle_backward.instance_norm_backward(dy, x, w, eps=eps)
    u = 2.0**-52 if x_dtype == "float64" else 2.0**-23
    n = layout.length
    wmax = 1.0 if w is None else max(1.0, float(np.abs(w).max()))
    if out[0] is not None:
        scale = (np.abs(rdx).max() + np.abs(dy).max()) * wmax
        tol = EPS[x_dtype] * np.abs(rdx) + 64 * u * np.sqrt(n) * scale * 4 * (1 + np.abs(x).max())
        err = np.abs(out[0].reshape(rdx.shape) - rdx)
        assert (err <= tol).all(), f"dx: max error {err.max()} (tolerance {tol.min()})"
    rows = x.size // rdw.size
    mag = rows * np.abs(dy).max() * (1.0 + np.abs(x).max() * 4)
    for got, ref, what in ((out[1], rdw, "grad_weight"), (out[2], rdb, "grad_bias")):
        if got is None:
            continue
        ref = ref.reshape(-1)
        tol = EPS[grad_dtype] * np.abs(ref) + 64 * u * mag + 1e-300
        err = np.abs(got - ref)
        assert (err <= tol).all(), f"{what}: error {err.max()}"


CASES = [
    ("layer", (6, 5), (5,), "float32", "float32"),
    ("layer", (3, 4, 37), (37,), "float16", "float32"),
    ("layer", (3, 4, 5, 7), (5, 7), "bfloat16", "bfloat16"),
    ("layer", (5, 9), (9,), "float64", "float64"),
    ("layer", (7, 300), (300,), "float32", "float16"),
    ("layer", (4, 3, 11), (3, 11), "float64", "float32"),
    ("group", (3, 6, 5), 3, "float32", "float32"),
    ("group", (2, 4, 3, 3), 2, "float16", "float16"),
    ("group", (2, 6, 7), 6, "bfloat16", "float32"),
    ("group", (3, 4, 5), 1, "float64", "float64"),
    ("instance", (3, 4, 5), None, "float32", "float32"),
    ("instance", (2, 3, 3, 7), None, "bfloat16", "float32"),
    ("instance", (2, 5, 9), None, "float64", "float16"),
]


@pytest.mark.parametrize("kind,shape,arg,x_dtype,p_dtype", CASES)
def test_backward_matches_the_oracle(kind, shape, arg, x_dtype, p_dtype):
    out, data, plan = run(get_launcher(sm_count=2), kind, shape, arg, x_dtype, p_dtype)
    assert len(plan) == 4
    check(out, data, kind, arg, x_dtype, p_dtype)


@pytest.mark.parametrize("chunks", [1, 3])
def test_column_reduction_chunks(chunks):
    out, data, plan = run(get_launcher(sm_count=2), "layer", (7, 33), (33,), "float32", "float32", chunks=chunks)
    assert plan[2].grid[1] == min(chunks, 7)
    check(out, data, "layer", (33,), "float32", "float32")


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)])
def test_output_masks(mask):
    out, data, plan = run(get_launcher(sm_count=2), "layer", (4, 19), (19,), "float32", "float32", mask=mask)
    assert len(plan) == (2 if mask[0] else 0) + (2 if mask[1] or mask[2] else 0)
    for got, m in zip(out, mask):
        assert (got is not None) == m
    check(out, data, "layer", (19,), "float32", "float32")


def test_no_weight():
    out, data, _ = run(get_launcher(sm_count=2), "group", (2, 4, 6), 2, "float16", "float32", use_weight=False)
    check(out, data, "group", 2, "float16", "float16")


@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
def test_bitwise_repeatable_across_schedules(x_dtype):
    results = []
    for seed in (1, 2, 3):
        out, _, _ = run(get_launcher(sm_count=2, seed=seed), "layer", (5, 300), (300,), x_dtype, "float32",
                        chunks=2)
        results.append(out)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


def test_planner_checks():
    x = planner.Operand(None, (2, 3), (3, 1), "float32")
    layout = planner.layer_norm_layout(x.shape, (3,))
    st = planner.Operand(None, (2,), (1,), "float32")
    with pytest.raises(ValueError, match="sums"):
        planner.plan_groups_backward(x, x, x, layout, st, st, None, None, None, None, None)
    with pytest.raises(ValueError, match="workspace"):
        planner.plan_groups_backward(x, x, None, layout, st, st, None, st.__class__(None, (3,), (1,), "float32"),
                                     None, None, None)
    empty = planner.Operand(None, (0, 3), (3, 1), "float32")
    assert planner.plan_groups_backward(empty, empty, empty, planner.layer_norm_layout((0, 3), (3,)),
                                        planner.Operand(None, (0,), (1,), "float32"),
                                        planner.Operand(None, (0,), (1,), "float32"), None, None, None, None,
                                        None) == ()


# ------------------------------------------------------------------------------------ native API

@pytest.mark.parametrize("kind,shape,arg", [("layer", (6, 4), (4,)), ("layer", (2, 3, 5, 6), (5, 6)),
                                            ("group", (3, 4, 9), 2), ("group", (2, 6, 2, 3), 3),
                                            ("instance", (3, 4, 9), None), ("instance", (2, 3, 2, 5), None)])
@pytest.mark.parametrize("x_dtype", ["float32", "float64"])
def test_native_api_matches_the_cpu_path(emulated_gpu, kind, shape, arg, x_dtype):
    from cupybn import native

    rng = np.random.default_rng(5)
    pshape = arg if kind == "layer" else (shape[1],)
    p = np.float64 if x_dtype == "float64" else np.float32
    x = (rng.standard_normal(shape) * 2 + 1).astype(x_dtype)
    dy = rng.standard_normal(shape).astype(x_dtype)
    w, b = rng.standard_normal(pshape).astype(p), rng.standard_normal(pshape).astype(p)
    wg, bg = emulator.array(w), emulator.array(b)
    tol = dict(rtol=1e-5, atol=1e-5) if x_dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    if kind == "layer":
        fwd = lambda xx, ww, bb: native.native_layer_norm(xx, arg, ww, bb, 1e-5)  # noqa: E731
        bwd = lambda gg, xx, m, r, ww, bb, mask: native.layer_norm_backward(gg, xx, arg, m, r, ww, bb, mask)  # noqa: E731
    elif kind == "group":
        fwd = lambda xx, ww, bb: native.native_group_norm(xx, arg, ww, bb, 1e-5)  # noqa: E731
        bwd = lambda gg, xx, m, r, ww, bb, mask: native.group_norm_backward(gg, xx, m, r, ww, arg, mask)  # noqa: E731
    else:
        fwd = lambda xx, ww, bb: native.native_instance_norm(xx, ww, bb, None, None, True, 0.1, 1e-5)  # noqa: E731
        bwd = lambda gg, xx, m, r, ww, bb, mask: native.instance_norm_backward(  # noqa: E731
            gg, xx, ww, None, None, m, r, True, 1e-5, mask)
    got = fwd(emulator.array(x), wg, bg)
    # layer / group: statistics + normalize; instance: the fused forward, then a statistics launch
    assert len(emulated_gpu.plans[-1]) == (1 if kind == "instance" else 2)
    ref = fwd(x, w, b)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, **tol)
    for mask in ((True, True, True), (True, False, False), (False, True, True)):
        out = bwd(emulator.array(dy), emulator.array(x), got[1], got[2], wg, bg, mask)
        assert len(emulated_gpu.plans[-1]) == (2 if mask[0] else 0) + (2 if mask[1] or mask[2] else 0)
        expect = bwd(dy, x, ref[1], ref[2], w, b, mask)
        for g, r in zip(out, expect):
            assert (g is None) == (r is None)
            if g is not None:
                assert g.shape == r.shape and g.dtype == r.dtype
                np.testing.assert_allclose(g, r, **tol)


def test_native_instance_norm_updates_running_statistics(emulated_gpu):
    from cupybn import native

    rng = np.random.default_rng(8)
    shape = (3, 4, 10)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    rm_c, rv_c = np.zeros(4, np.float32), np.ones(4, np.float32)
    rm_g, rv_g = emulator.array(rm_c), emulator.array(rv_c)
    got = native.native_instance_norm(emulator.array(x), None, None, rm_g, rv_g, True, 0.1, 1e-5)
    ref = native.native_instance_norm(x, None, None, rm_c, rv_c, True, 0.1, 1e-5)
    for g, r in zip(got + (rm_g, rv_g), ref + (rm_c, rv_c)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
