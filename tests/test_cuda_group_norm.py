"""GroupNorm forward on the GPU path, executed on the CPU through the CUDA emulator.

Same kernels as LayerNorm (kernels/fused_groups.cu; the helpers live in test_cuda_layer_norm.py):
groups of ``C / G * spatial`` values per sample with a per-channel affine, against the float64
oracle for every dtype; one block per group (warp / block / long paths) and many blocks per group
(the split path: moments_forward with ``splits`` blocks per group, then normalize_groups).
"""
from __future__ import annotations

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

from cupybn._cuda import planner  # noqa: E402
from test_cuda_batch_norm_eval import get_launcher  # noqa: E402
from test_cuda_layer_norm import DTYPES, Run, emulated, emulated_gpu, to_emulator  # noqa: E402,F401

pytestmark = pytest.mark.emulator

CASES = [((2, 4, 5), 2, "warp"), ((3, 6, 3, 5), 3, "warp"), ((2, 4, 7, 11), 2, "block"),
         ((2, 4, 7, 11), 2, "long"), ((2, 4, 7, 11), 1, "split"), ((2, 6), 6, "warp")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,path", CASES, ids=str)
def test_matches_oracle(dtype, shape, groups, path):
    if dtype == "float64" and path == "warp":
        path = "block"  # no warp-per-group kernel for float64 (planner.fused_tiling)
    r = Run("group", shape, dtype, groups)
    split = path == "split"
    plan = r.run(path=path, splits=3 if split else None, threads=32 if split else None)
    assert plan[-1].notes["path"] == path
    if split:
        assert len(plan) == 2 and plan[0].notes["splits"] == 3
    r.check()


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("p_dtype", ["float16", "bfloat16", "float64"])
def test_optional_affine_and_parameter_dtypes(weight, bias, p_dtype):
    r = Run("group", (2, 6, 9), "float32", 3, weight=weight, bias=bias, p_dtype=p_dtype)
    r.run()
    r.check()


def test_large_mean_small_std_and_misaligned():
    for path in ("warp", "block", "long", "split"):
        r = Run("group", (2, 4, 30), "float32", 2, values="large_mean", x_offset=1)
        r.run(path=path, splits=2 if path == "split" else None, threads=32 if path == "split" else None)
        assert np.abs(r.out() - r.expected()[0]).max() < 1e-3, path


def test_size_one_groups_nan_and_eps():
    r = Run("group", (3, 4), "float32", 4)  # (N, C) with G = C: groups of one value -> y = bias
    r.run()
    r.check()
    data = np.random.default_rng(1).standard_normal((2, 4, 6))
    data[1, 0, 2] = np.nan
    r = Run("group", (2, 4, 6), "float16", 2, data=data, eps=-1e-4)
    r.run()
    out = r.out()
    assert np.isnan(out[1, :2]).all() and np.isfinite(out[1, 2:]).all() and np.isfinite(out[0]).all()
    r.check()


def test_auto_path_and_traffic():
    """(8, 64, 28, 28) G=32: 256 groups of 1568 values, a block per group, 1 launch, x read once
    (checked on a smaller shape of the same path here; bench/traffic.py measures the real one)."""
    x = planner.Operand(None, (8, 64, 28, 28), (64 * 784, 784, 28, 1), "float32")
    lay = planner.group_norm_layout(x.shape, 32)
    plan = planner.plan_groups_forward(x, x, lay, None, None, 1e-5, False)
    assert [p.notes["path"] for p in plan] == ["block"]
    r = Run("group", (4, 8, 6, 6), "float32", 4)
    launcher = get_launcher(sm_count=2)
    plan = r.plan(launcher)
    with launcher.module("fused_groups.cu").track(x=r.x, y=r.y) as t:
        launcher.launch(plan)
    assert t.launches == 1 and t.passes("x") <= 1.0
    r.check()


def test_empty_batch():
    assert Run("group", (0, 4, 5), "float32", 2).plan() == ()


@pytest.mark.parametrize("shape,groups", [((4, 6, 5), 3), ((2, 8, 3, 3), 4), ((3, 4), 2)], ids=str)
def test_layer_matches_the_cpu_path(emulated, shape, groups):
    import cupybn

    rng = np.random.default_rng(7)
    layer = cupybn.GroupNorm(groups, shape[1])
    layer.weight[...] = rng.standard_normal(shape[1]).astype(np.float32)
    layer.bias[...] = rng.standard_normal(shape[1]).astype(np.float32)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    y_cpu = layer(x)
    y_gpu = to_emulator(layer)(emulator.array(x))
    assert len(emulated.plans[-1]) == 1
    np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_functional_matches_the_cpu_path(emulated, dtype):
    import cupybn

    rng = np.random.default_rng(8)
    x = (rng.standard_normal((3, 6, 10)) * 2).astype(dtype)
    b = rng.standard_normal(6).astype(np.float32)
    y_c = np.asarray(cupybn.group_norm(x, 2, None, b, eps=1e-3), np.float64)
    y_g = np.asarray(cupybn.group_norm(emulator.array(x), 2, None, emulator.array(b), eps=1e-3), np.float64)
    tol = 1e-12 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(y_g, y_c, rtol=tol, atol=tol)
    assert cupybn.group_norm(emulator.zeros((0, 6, 10), dtype), 2).shape == (0, 6, 10)
