"""LayerNorm forward on the GPU path, executed on the CPU through the CUDA emulator.

planner.plan_groups_forward -> kernels/fused_groups.cu (fused_groups: warp per row, block per row,
long-row fallback; normalize_groups after moments_forward on the split path), against the float64
oracle (tests/oracle.py) for every dtype; each path is forced through the planner (``path``,
``splits``, a small ``smem_limit``) so small shapes reach it. The helpers here (``run_groups``)
serve the group and instance norm tests too.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

import oracle  # noqa: E402
from cupybn._cuda import planner  # noqa: E402
from test_cuda_batch_norm_eval import EPS, alloc, alloc_empty, get_launcher, quantize, to_float64  # noqa: E402
from test_cuda_batch_norm_train import _to_emulator, emulated_gpu  # noqa: E402,F401

pytestmark = pytest.mark.emulator

DTYPES = planner.FLOAT_DTYPES
PATHS = ("warp", "block", "long", "split")


def acc_of(dtype):
    return np.float64 if dtype == "float64" else np.float32


class Run:
    """One forward of a group-wise norm in emulator memory, and its oracle."""

    def __init__(self, norm, shape, dtype, arg=None, *, p_dtype=None, weight=True, bias=True, eps=1e-5,
                 values="normal", data=None, running=False, r_dtype=None, momentum=0.1, x_offset=0, seed=0):
        rng = np.random.default_rng(seed)
        self.norm, self.shape, self.dtype, self.arg, self.eps, self.momentum = norm, shape, dtype, arg, eps, momentum
        if data is not None:
            x = data
        elif values == "normal":
            x = rng.standard_normal(shape) * 2.0 + 0.5
        elif values == "large_mean":
            x = 1e4 + 1e-2 * rng.standard_normal(shape)
        else:
            raise ValueError(values)
        self.x64 = quantize(x, dtype)[1]
        self.x = alloc(emulator, self.x64, dtype, x_offset)
        self.y = alloc_empty(emulator, shape, dtype, x_offset)
        if norm == "layer":
            self.layout = planner.layer_norm_layout(shape, tuple(arg))
            pshape = tuple(arg)
        elif norm == "group":
            self.layout = planner.group_norm_layout(shape, arg)
            pshape = (shape[1],)
        else:
            self.layout = planner.instance_norm_layout(shape)
            pshape = (shape[1],)
        self.p_dtype = p_dtype or ("float64" if dtype == "float64" else "float32")
        self.w64 = quantize(rng.standard_normal(pshape), self.p_dtype)[1] if weight else None
        self.b64 = quantize(rng.standard_normal(pshape), self.p_dtype)[1] if bias else None
        self.w = alloc(emulator, self.w64, self.p_dtype) if weight else None
        self.b = alloc(emulator, self.b64, self.p_dtype) if bias else None
        self.r_dtype = r_dtype or "float32"
        c = shape[1] if len(shape) > 1 else 1
        self.rm64 = quantize(rng.standard_normal(c) * 0.3, self.r_dtype)[1] if running else None
        self.rv64 = quantize(rng.uniform(0.5, 2.0, c), self.r_dtype)[1] if running else None
        self.rm = alloc(emulator, self.rm64, self.r_dtype) if running else None
        self.rv = alloc(emulator, self.rv64, self.r_dtype) if running else None
        g = max(self.layout.groups, 1)
        acc = acc_of(dtype)
        self.save = tuple(planner.Operand(emulator.empty((g,), acc), (self.layout.groups,), (1,),
                                          np.dtype(acc).name) for _ in range(3))

    def op(self, a, dtype):
        return None if a is None else planner.Operand.of(a.reshape(-1) if a.ndim > 1 else a,
                                                         dtype if dtype == "bfloat16" else None)

    def plan(self, launcher=None, **kw):
        launcher = launcher or get_launcher(sm_count=2)
        return planner.plan_groups_forward(
            self.op(self.x, self.dtype), self.op(self.y, self.dtype), self.layout,
            self.op(self.w, self.p_dtype), self.op(self.b, self.p_dtype), self.eps, self.norm == "instance",
            self.op(self.rm, self.r_dtype), self.op(self.rv, self.r_dtype), self.momentum, save=self.save,
            device=launcher.device_info(), **kw)

    def run(self, launcher=None, **kw):
        launcher = launcher or get_launcher(sm_count=2)
        plan = self.plan(launcher, **kw)
        launcher.launch(plan)
        return plan

    def out(self):
        return to_float64(self.y, self.dtype).reshape(self.shape)

    def expected(self):
        if self.norm == "layer":
            return oracle.layer_norm(self.x64, tuple(self.arg), self.w64, self.b64, self.eps), None, None
        if self.norm == "group":
            return oracle.group_norm(self.x64, self.arg, self.w64, self.b64, self.eps), None, None
        return oracle.instance_norm(self.x64, self.rm64, self.rv64, self.w64, self.b64, True, self.momentum,
                                    self.eps)

    def check(self, scale=1.0):
        ref, rm, rv = self.expected()
        got = self.out()
        acc_tol = 1e-12 if self.dtype == "float64" else 2e-5
        tol = scale * (EPS[self.dtype] * np.abs(ref) + acc_tol * (1 + np.abs(ref)))
        finite = np.isfinite(ref)
        assert (np.isnan(got) == np.isnan(ref)).all(), "NaN pattern differs"
        err = np.abs(got - ref)
        assert (err[finite] <= tol[finite]).all(), f"max error {err[finite].max()} (tolerance {tol[finite].min()})"
        if rm is not None:
            r_eps = EPS[self.r_dtype]
            np.testing.assert_allclose(to_float64(self.rm, self.r_dtype), rm, rtol=2 * r_eps + 1e-6, atol=1e-6)
            np.testing.assert_allclose(to_float64(self.rv, self.r_dtype), rv, rtol=2 * r_eps + 1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ every path, every dtype

CASES = [((6, 7), (7,), "warp"), ((3, 5, 40), (5, 40), "warp"), ((2, 333), (333,), "block"),
         ((2, 333), (333,), "long"), ((3, 333), (333,), "split")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized,path", CASES, ids=str)
def test_matches_oracle(dtype, shape, normalized, path):
    if dtype == "float64" and path == "warp":
        path = "block"  # no warp-per-group kernel for float64 (planner.fused_tiling)
    r = Run("layer", shape, dtype, normalized)
    plan = r.run(path=path, splits=3 if path == "split" else None, threads=32 if path == "split" else None)
    assert plan[-1].notes["path"] == path
    if path == "split":
        assert len(plan) == 2 and plan[0].notes["splits"] == 3
    r.check()


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("path", ["warp", "split"])
def test_optional_affine(weight, bias, path):
    r = Run("layer", (4, 50), "float32", (50,), weight=weight, bias=bias)
    r.run(path=path, splits=2 if path == "split" else None, threads=32 if path == "split" else None)
    r.check()


@pytest.mark.parametrize("p_dtype", DTYPES)
def test_parameter_dtypes(p_dtype):
    r = Run("layer", (3, 24), "float16", (24,), p_dtype=p_dtype)
    r.run()
    r.check()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("path", ["warp", "block"])
def test_misaligned_rows_and_views(dtype, path):
    r = Run("layer", (5, 13), dtype, (13,), x_offset=1)
    r.run(path=path)
    r.check()


def test_auto_paths():
    """The planner's choice for the bench shapes and beyond (no execution)."""
    def path_of(shape, dtype, groups_device=132, **kw):
        x = planner.Operand(None, shape, tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape))), dtype)
        lay = planner.layer_norm_layout(shape, shape[-1:])
        acc = planner.accumulation_dtype(dtype)
        save = tuple(planner.Operand(None, (lay.groups,), (1,), acc) for _ in range(3))
        plan = planner.plan_groups_forward(x, x, lay, None, None, 1e-5, False, save=save,
                                           device=planner.DeviceInfo(sm_count=groups_device), **kw)
        return [p.notes.get("path") for p in plan], plan[-1]

    assert path_of((4096, 768), "float32")[0] == ["block"]
    assert path_of((4096, 512), "float32")[0] == ["warp"]
    assert path_of((4096, 768), "float16")[0] == ["warp"]
    paths, launch = path_of((64, 8192), "float32")
    assert paths == ["block"] and launch.block == (512, 1, 1)
    assert path_of((64, 8192), "float16")[0] == ["block"]
    assert path_of((4, 20000), "float32")[0] == [None, "split"]  # few huge rows: many blocks per row
    assert path_of((400, 20000), "float32")[0] == ["long"]       # many huge rows: a block per row
    assert path_of((64, 8192), "float32", smem_limit=1024)[0] == [None, "split"]
    assert path_of((64, 8192), "float32", groups_device=2, smem_limit=1024)[0] == ["long"]


def test_large_mean_small_std():
    for path in ("warp", "block", "long", "split"):
        r = Run("layer", (3, 300), "float32", (300,), values="large_mean")
        r.run(path=path, splits=2 if path == "split" else None, threads=32 if path == "split" else None)
        ref = r.expected()[0]
        assert np.abs(r.out() - ref).max() < 1e-3, path


@pytest.mark.parametrize("path", ["warp", "long", "split"])
def test_size_one_rows_and_eps(path):
    r = Run("layer", (5, 1), "float32", (1,))
    r.run(path=path if path != "split" else "long")
    r.check()  # every row is its own mean: y = bias
    # eps = 0 on a constant row: 0 * inf = NaN, as the CPU path and torch give
    data = np.ones((3, 40))
    data[1] = np.arange(40)
    r = Run("layer", (3, 40), "float32", (40,), data=data, eps=0.0)
    r.run(path="warp")
    out = r.out()
    assert np.isnan(out[0]).all() and np.isnan(out[2]).all() and np.isfinite(out[1]).all()
    r.check()
    # negative eps is legal for layer norm
    r = Run("layer", (3, 40), "float64", (40,), eps=-1e-3)
    r.run()
    r.check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_stay_in_their_row(dtype):
    data = np.random.default_rng(2).standard_normal((4, 30))
    data[1, 3] = np.nan
    data[2, 7] = np.inf
    r = Run("layer", (4, 30), dtype, (30,), data=data)
    r.run()
    out = r.out()
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    assert np.isfinite(out[0]).all() and np.isfinite(out[3]).all()
    r.check()


def test_empty_input_launches_nothing():
    r = Run("layer", (0, 8), "float32", (8,))
    assert r.plan() == ()


@pytest.mark.parametrize("seed", [0, 3, 12345])
def test_bitwise_repeatable_across_schedules(seed):
    runs = []
    for s in (1, seed):
        r = Run("layer", (3, 3000), "float32", (3000,))
        r.run(get_launcher(sm_count=2, seed=s), path="split", splits=4, threads=32)
        runs.append(np.asarray(r.y).tobytes())
    assert runs[0] == runs[1]


# ------------------------------------------------------------------------------------ traffic

@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("path", ["warp", "block"])
def test_one_launch_one_pass(dtype, path):
    r = Run("layer", (16, 256), dtype, (256,))
    plan = r.plan(path=path)
    launcher = get_launcher(sm_count=2)
    with launcher.module("fused_groups.cu").track(x=r.x, y=r.y) as t:
        launcher.launch(plan)
    assert t.launches == 1 and t.passes("x") <= 1.0 and t.passes("y") <= 1.0
    r.check()


@pytest.mark.parametrize("path,launches", [("long", 1), ("split", 2)])
def test_fallbacks_read_x_twice(path, launches):
    r = Run("layer", (4, 2000), "float32", (2000,))
    launcher = get_launcher(sm_count=2)
    plan = r.plan(launcher, path=path, splits=2 if path == "split" else None)
    with launcher.module("fused_groups.cu").track(x=r.x, y=r.y) as t:
        launcher.launch(plan)
    assert t.launches == launches and t.passes("x") <= 2.0 and t.passes("y") <= 1.0
    r.check()


# ------------------------------------------------------------------------------------ layers on the emulated GPU path

@pytest.fixture
def emulated(emulated_gpu):
    """The emulated GPU path (test_cuda_batch_norm_train): emulator-memory arrays take the GPU
    path, other NumPy arrays the CPU path they are compared with."""
    return emulated_gpu


def to_emulator(layer):
    """A layer's parameters and running statistics in emulator memory ("on the GPU")."""
    _to_emulator(layer)
    return layer

@pytest.mark.parametrize("shape,normalized", [((4, 10), (10,)), ((2, 3, 4, 5), (4, 5)), ((7,), (7,))], ids=str)
@pytest.mark.parametrize("elementwise_affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_matches_the_cpu_path(emulated, shape, normalized, elementwise_affine, bias):
    import cupybn

    rng = np.random.default_rng(5)
    layer = cupybn.LayerNorm(normalized, elementwise_affine=elementwise_affine, bias=bias)
    if layer.weight is not None:
        layer.weight[...] = rng.standard_normal(normalized).astype(np.float32)
    if layer.bias is not None:
        layer.bias[...] = rng.standard_normal(normalized).astype(np.float32)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    y_cpu = layer(x)
    y_gpu = to_emulator(layer)(emulator.array(x))
    assert len(emulated.plans[-1]) == 1
    np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_functional_matches_the_cpu_path(emulated, dtype):
    import cupybn

    rng = np.random.default_rng(6)
    storage = np.float16 if dtype == "float16" else np.float64 if dtype == "float64" else np.float32
    x = (rng.standard_normal((6, 33)) * 2).astype(storage)
    w = rng.standard_normal(33).astype(np.float32)
    y_c = np.asarray(cupybn.layer_norm(x, (33,), w, None, eps=1e-3), np.float64)
    y_g = np.asarray(cupybn.layer_norm(emulator.array(x), (33,), emulator.array(w), None, eps=1e-3), np.float64)
    tol = 1e-12 if dtype == "float64" else 2e-3
    np.testing.assert_allclose(y_g, y_c, rtol=tol, atol=tol)
    empty = cupybn.layer_norm(emulator.zeros((0, 33), storage), (33,))
    assert empty.shape == (0, 33)
