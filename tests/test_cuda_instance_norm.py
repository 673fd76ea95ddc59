"""InstanceNorm forward on the GPU path, executed on the CPU through the CUDA emulator.

Same kernels as LayerNorm and GroupNorm (kernels/fused_groups.cu; helpers in
test_cuda_layer_norm.py): one group per (sample, channel), per-channel affine, batch norm's
eps == 0 rule, and the running statistics (mean over the batch of the per-instance statistics,
unbiased variance) updated on the device by the last block of the fused launch, in sample order.
"""
from __future__ import annotations

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

from cupybn._cuda import planner  # noqa: E402
from test_cuda_batch_norm_eval import get_launcher  # noqa: E402
from test_cuda_layer_norm import DTYPES, Run, emulated, emulated_gpu, to_emulator  # noqa: E402,F401

pytestmark = pytest.mark.emulator

CASES = [((2, 3, 7), "warp"), ((2, 3, 4, 5), "warp"), ((2, 2, 2, 3, 4), "warp"), ((2, 2, 600), "block"),
         ((2, 2, 600), "long"), ((1, 2, 900), "split")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,path", CASES, ids=str)
def test_matches_oracle(dtype, shape, path):
    if dtype == "float64" and path == "warp":
        path = "block"  # no warp-per-group kernel for float64 (planner.fused_tiling)
    split = path == "split"
    r = Run("instance", shape, dtype, running=not split)
    plan = r.run(path=path, splits=3 if split else None, threads=32 if split else None)
    assert plan[-1].notes["path"] == path
    r.check()


@pytest.mark.parametrize("r_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", ["float16", "float64"])
def test_running_stat_dtypes_over_steps(x_dtype, r_dtype):
    """Three launches on the same counters: the ticket counter is reset by every launch."""
    launcher = get_launcher(sm_count=2)
    r = Run("instance", (3, 4, 10), x_dtype, running=True, r_dtype=r_dtype, momentum=0.3)
    for step in range(3):
        r.rm64, r.rv64 = (np.asarray(a, np.float64).copy() for a in (
            _f64(r.rm, r_dtype), _f64(r.rv, r_dtype)))
        r.run(launcher)
        r.check()
        assert not launcher.counters.any()


def _f64(a, dtype):
    from test_cuda_batch_norm_eval import to_float64

    return to_float64(a, dtype)


def test_running_stats_bitwise_repeatable_across_schedules():
    outs = []
    for seed in (0, 3, 12345):
        r = Run("instance", (5, 3, 40), "float32", running=True)
        r.run(get_launcher(sm_count=2, seed=seed))
        outs.append([np.asarray(a).tobytes() for a in (r.y, r.rm, r.rv)])
    assert outs[0] == outs[1] == outs[2]


def test_long_path_updates_running_stats_and_split_refuses_them():
    r = Run("instance", (2, 3, 700), "float32", running=True)
    plan = r.run(smem_limit=256)
    assert plan[0].notes["path"] == "long"
    r.check()
    with pytest.raises(ValueError, match="running"):
        r.plan(path="split")


def test_eps_zero_constant_instance_gives_bias_and_large_mean():
    data = np.random.default_rng(3).standard_normal((2, 3, 16))
    data[0, 1] = 4.0
    r = Run("instance", (2, 3, 16), "float32", data=data, eps=0.0)
    r.run()
    out = r.out()
    np.testing.assert_array_equal(out[0, 1], np.float32(r.b64[1]))
    r.check()
    r = Run("instance", (2, 3, 64), "float32", values="large_mean", running=True)
    r.run()
    assert np.abs(r.out() - r.expected()[0]).max() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(dtype):
    data = np.random.default_rng(4).standard_normal((2, 3, 12))
    data[1, 2, 5] = np.inf
    r = Run("instance", (2, 3, 12), dtype, data=data)
    r.run()
    out = r.out()
    assert np.isnan(out[1, 2]).all() and np.isfinite(out[0]).all() and np.isfinite(out[1, :2]).all()


def test_traffic_two_launches_at_most():
    x = planner.Operand(None, (8, 16, 32, 32), (16 * 1024, 1024, 32, 1), "float32")
    plan = planner.plan_groups_forward(x, x, planner.instance_norm_layout(x.shape), None, None, 1e-5, True)
    assert [p.notes["path"] for p in plan] == ["block"]
    r = Run("instance", (4, 4, 8, 8), "float16", running=True)
    launcher = get_launcher(sm_count=2)
    plan = r.plan(launcher)
    with launcher.module("fused_groups.cu").track(x=r.x, y=r.y) as t:
        launcher.launch(plan)
    assert t.launches == 1 and t.passes("x") <= 1.0 and t.passes("y") <= 1.0
    r.check()


def test_empty_batch_leaves_running_stats():
    r = Run("instance", (0, 3, 5), "float32", running=True)
    assert r.plan() == ()


@pytest.mark.parametrize("cls,shape", [("InstanceNorm1d", (3, 4, 9)), ("InstanceNorm1d", (4, 9)),
                                       ("InstanceNorm2d", (2, 3, 5, 6)), ("InstanceNorm2d", (3, 5, 6)),
                                       ("InstanceNorm3d", (2, 2, 3, 4, 5))], ids=str)
@pytest.mark.parametrize("track", [True, False])
def test_layers_match_the_cpu_path(emulated, cls, shape, track):
    import cupybn

    rng = np.random.default_rng(9)
    batched = len(shape) == int(cls[-2]) + 2  # InstanceNorm1d takes (N, C, L) or unbatched (C, L)
    c = shape[1] if batched else shape[0]
    cpu = getattr(cupybn, cls)(c, affine=True, track_running_stats=track, momentum=0.2)
    gpu = getattr(cupybn, cls)(c, affine=True, track_running_stats=track, momentum=0.2)
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    for layer in (cpu, gpu):
        layer.weight[...] = w
        layer.bias[...] = b
    to_emulator(gpu)
    for _ in range(2):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        np.testing.assert_allclose(gpu(emulator.array(x)), cpu(x), rtol=1e-5, atol=2e-5)
        assert len(emulated.plans[-1]) == 1
        if track:
            np.testing.assert_allclose(gpu.running_mean, cpu.running_mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(gpu.running_var, cpu.running_var, rtol=1e-5, atol=1e-6)
            assert int(gpu.num_batches_tracked) == int(cpu.num_batches_tracked) == 0
    gpu.eval()
    cpu.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(gpu(emulator.array(x)), cpu(x), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_functional_matches_the_cpu_path(emulated, dtype):
    import cupybn

    rng = np.random.default_rng(10)
    x = (rng.standard_normal((3, 4, 11)) * 2).astype(dtype)
    p = np.float64 if dtype == np.float64 else np.float32
    rm_c, rv_c = np.zeros(4, p), np.ones(4, p)
    rm_g, rv_g = emulator.array(rm_c), emulator.array(rv_c)
    y_c = np.asarray(cupybn.instance_norm(x, rm_c, rv_c, momentum=0.3, eps=1e-3), np.float64)
    y_g = np.asarray(cupybn.instance_norm(emulator.array(x), rm_g, rv_g, momentum=0.3, eps=1e-3), np.float64)
    tol = 1e-12 if dtype == np.float64 else 2e-3
    np.testing.assert_allclose(y_g, y_c, rtol=tol, atol=tol)
    np.testing.assert_allclose(rm_g, rm_c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv_g, rv_c, rtol=1e-6, atol=1e-7)
    # use_input_stats=False: the running statistics normalize (batch norm's eval kernel)
    y_c = np.asarray(cupybn.instance_norm(x, rm_c, rv_c, use_input_stats=False), np.float64)
    y_g = np.asarray(cupybn.instance_norm(emulator.array(x), rm_g, rv_g, use_input_stats=False), np.float64)
    np.testing.assert_allclose(y_g, y_c, rtol=tol, atol=tol)
    assert cupybn.instance_norm(emulator.zeros((0, 4, 11), dtype), rm_g, rv_g).shape == (0, 4, 11)
    np.testing.assert_allclose(rm_g, rm_c, rtol=1e-6, atol=1e-7)
