"""GPU path on a real GPU: CuPy arrays and CUDA torch tensors through ``cupybn._cuda.batch_norm_forward``.

The same cases as the emulator tests (tests/test_cuda_batch_norm_eval.py), now compiled by CuPy
(NVRTC) and run on the device: results must equal the NumPy model of the kernel arithmetic bit
for bit (the kernel pins every float operation to IEEE round-to-nearest, CuPy's -ftz=true
notwithstanding) and agree with ``torch.nn.functional.batch_norm`` within rounding.

Skipped cleanly, module-wide, when CuPy has no GPU (and torch cases when torch has no CUDA).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
try:
    _have_gpu = bool(cupy.cuda.is_available())
except Exception:  # a broken driver install reads as "no GPU" here
    _have_gpu = False
if not _have_gpu:
    pytest.skip("needs a CUDA GPU (cupy.cuda.is_available() is False)", allow_module_level=True)

from cupybn import _cuda  # noqa: E402
from test_cuda_batch_norm_eval import (SHAPES, error_bound, float64_formula, kernel_arithmetic,  # noqa: E402
                                       make_inputs, quantize)

try:
    import torch

    _have_torch_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    torch = None
    _have_torch_cuda = False

needs_torch = pytest.mark.skipif(not _have_torch_cuda, reason="needs torch with CUDA")

CUPY_DTYPES = ("float16", "float32", "float64")  # CuPy has no bfloat16
TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _torch_dtype(name):
    return getattr(torch, name)


def _torch(values64, dtype):
    return torch.tensor(values64, dtype=torch.float64, device="cuda").to(_torch_dtype(dtype))


def _assert_exact(y64, x, p, eps, x_dtype, use_weight=True, use_bias=True):
    exact = kernel_arithmetic(x, p, eps, x_dtype, use_weight, use_bias)
    same = (y64 == exact) | (np.isnan(y64) & np.isnan(exact))
    assert same.all(), f"{int((~same).sum())} elements differ from the kernel arithmetic"
    ref = float64_formula(x, p, eps, use_weight, use_bias)
    assert (np.abs(y64 - ref) <= error_bound(x, p, eps, x_dtype, ref, use_weight, use_bias)).all()


# ------------------------------------------------------------------------------------ CuPy arrays

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype,p_dtype", list(itertools.product(CUPY_DTYPES, CUPY_DTYPES)))
def test_cupy_matches_kernel_arithmetic(x_dtype, p_dtype, shape):
    xs, p = make_inputs(shape, x_dtype, p_dtype, np.random.default_rng(0))
    x = cupy.asarray(xs["x"].astype(x_dtype))
    params = {k: cupy.asarray(v.astype(p_dtype)) for k, v in p.items()}
    y = _cuda.batch_norm_forward(x, params["mean"], params["var"], params["weight"], params["bias"],
                                 False, 0.1, 1e-5)
    assert isinstance(y, cupy.ndarray) and y.dtype == x.dtype and y.shape == x.shape
    _assert_exact(cupy.asnumpy(y).astype(np.float64), xs["x"], p, 1e-5, x_dtype)


def test_cupy_runs_on_the_current_stream_without_sync():
    xs, p = make_inputs((8, 16, 32, 32), "float32", "float32", np.random.default_rng(1))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.asarray(xs["x"].astype(np.float32))
        params = [cupy.asarray(p[k].astype(np.float32)) for k in ("mean", "var", "weight", "bias")]
        y = _cuda.batch_norm_forward(x, *params, False, 0.1, 1e-5)
    stream.synchronize()
    _assert_exact(cupy.asnumpy(y).astype(np.float64), xs["x"], p, 1e-5, "float32")


def test_cupy_non_contiguous_and_misaligned():
    xs, p = make_inputs((4, 3, 9, 7), "float32", "float32", np.random.default_rng(2))
    base = cupy.asarray(xs["x"].astype(np.float32))
    params = [cupy.asarray(p[k].astype(np.float32)) for k in ("mean", "var", "weight", "bias")]
    # transposed spatial dims: non-contiguous
    xt = base.transpose(0, 1, 3, 2)
    y = _cuda.batch_norm_forward(xt, *params, False, 0.1, 1e-5)
    _assert_exact(cupy.asnumpy(y).astype(np.float64), xs["x"].transpose(0, 1, 3, 2), p, 1e-5, "float32")
    # a view that starts one element into its allocation: contiguous but not 16-byte aligned
    flat = cupy.empty(base.size + 1, np.float32)
    flat[1:] = base.ravel()
    xm = flat[1:].reshape(base.shape)
    y = _cuda.batch_norm_forward(xm, *params, False, 0.1, 1e-5)
    _assert_exact(cupy.asnumpy(y).astype(np.float64), xs["x"], p, 1e-5, "float32")


def test_cupy_mixed_parameter_dtypes_and_optional_affine():
    xs, p = make_inputs((2, 5, 6), "float16", "float16", np.random.default_rng(3))
    x = cupy.asarray(xs["x"].astype(np.float16))
    mean = cupy.asarray(p["mean"].astype(np.float32))
    var = cupy.asarray(p["var"].astype(np.float32))
    weight = cupy.asarray(p["weight"].astype(np.float16))
    y = _cuda.batch_norm_forward(x, mean, var, weight, None, False, 0.1, 1e-5)
    _assert_exact(cupy.asnumpy(y).astype(np.float64), xs["x"], p, 1e-5, "float16", use_bias=False)


def test_cupy_empty_batch():
    x = cupy.zeros((0, 3, 4), np.float32)
    vec = cupy.ones(3, np.float32)
    assert _cuda.batch_norm_forward(x, vec, vec, None, None, False, 0.1, 1e-5).shape == (0, 3, 4)
    nbt = cupy.zeros((), cupy.int64)
    y = _cuda.batch_norm_forward(x, vec, vec, None, None, True, 0.1, 1e-5, num_batches_tracked=nbt)
    assert y.shape == (0, 3, 4) and int(nbt) == 1 and (vec == 1).all()


# ------------------------------------------------------------------------------------ training, CuPy

TRAIN_SHAPES = [(5, 7), (64, 3), (3, 4, 11), (2, 3, 5, 7), (2, 3, 3, 4, 5), (4, 6, 1, 1), (1, 3, 8, 8),
                (8, 64, 28, 28), (64, 3, 64, 64), (256, 32), (16, 32, 100)]


def _train_reference(x64, rm, rv, w, b, momentum, eps, nbt):
    """float64 oracle of one training step: (y, new running mean, new running var)."""
    axes = (0,) + tuple(range(2, x64.ndim))
    bc = (1, -1) + (1,) * (x64.ndim - 2)
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    n = x64.size // x64.shape[1]
    with np.errstate(divide="ignore"):
        invstd = np.where((var == 0) & (eps == 0), 0.0, 1.0 / np.sqrt(var + eps))
    y = (x64 - mean.reshape(bc)) * (invstd * w).reshape(bc) + b.reshape(bc)
    f = 1.0 / (nbt + 1) if momentum is None else momentum
    return y, (1 - f) * rm + f * mean, (1 - f) * rv + f * var * n / (n - 1)


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype", CUPY_DTYPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cupy_training_matches_the_oracle(x_dtype, shape, momentum):
    rng = np.random.default_rng(10)
    c = shape[1]
    x64 = (rng.standard_normal(shape) * 2 + 1).astype(x_dtype).astype(np.float64)
    p = np.float64 if x_dtype == "float64" else np.float32
    w, b = rng.standard_normal(c).astype(p), rng.standard_normal(c).astype(p)
    rm, rv = (rng.standard_normal(c) * 0.1).astype(p), rng.uniform(0.5, 2, c).astype(p)
    x = cupy.asarray(x64.astype(x_dtype))
    rm_d, rv_d, nbt = cupy.asarray(rm), cupy.asarray(rv), cupy.asarray(np.int64(4))
    y = _cuda.batch_norm_forward(x, rm_d, rv_d, cupy.asarray(w), cupy.asarray(b), True, momentum, 1e-5,
                                 num_batches_tracked=nbt)
    y_ref, rm_ref, rv_ref = _train_reference(x64, rm.astype(np.float64), rv.astype(np.float64), w, b, momentum,
                                             1e-5, 4)
    out_eps = {"float16": 2.0**-10, "float32": 2.0**-20, "float64": 2.0**-44}[x_dtype]
    np.testing.assert_allclose(cupy.asnumpy(y).astype(np.float64), y_ref, rtol=2 * out_eps, atol=8 * out_eps)
    stat_eps = 2.0**-44 if x_dtype == "float64" else 2.0**-19
    np.testing.assert_allclose(cupy.asnumpy(rm_d), rm_ref, rtol=stat_eps, atol=stat_eps)
    np.testing.assert_allclose(cupy.asnumpy(rv_d), rv_ref, rtol=stat_eps, atol=stat_eps)
    assert int(nbt) == 5


def test_cupy_training_is_bitwise_repeatable_and_reuses_counters():
    rng = np.random.default_rng(11)
    x = cupy.asarray((rng.standard_normal((32, 3, 64, 64)) * 3 + 2).astype(np.float16))
    outs = []
    for _ in range(3):
        rm, rv = cupy.zeros(3, np.float32), cupy.ones(3, np.float32)
        y, mean, invstd = _cuda.batch_norm_training_forward(x, rm, rv, None, None, 0.1, 1e-5)
        outs.append([cupy.asnumpy(a).tobytes() for a in (y, mean, invstd, rm, rv)])
    assert outs[0] == outs[1] == outs[2]
    from cupybn._cuda.launchers import cupy_launcher

    counters = cupy_launcher().counters(1)
    assert not counters.any()  # every kernel left its counters at zero


def test_cupy_training_large_mean_and_eps_zero():
    rng = np.random.default_rng(12)
    x64 = (1e4 + 1e-2 * rng.standard_normal((16, 3, 50))).astype(np.float32).astype(np.float64)
    y = _cuda.batch_norm_forward(cupy.asarray(x64.astype(np.float32)), None, None, None, None, True, 0.1, 1e-5)
    ref = (x64 - x64.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x64.var(axis=(0, 2), keepdims=True) + 1e-5)
    assert np.abs(cupy.asnumpy(y) - ref).max() <= 1e-3
    xc = cupy.full((4, 2, 5), 0.75, np.float32)
    b = cupy.asarray(np.array([0.5, -1.0], np.float32))
    y = _cuda.batch_norm_forward(xc, None, None, None, b, True, 0.1, 0.0)
    assert (cupy.asnumpy(y)[:, 0] == 0.5).all() and (cupy.asnumpy(y)[:, 1] == -1.0).all()


def test_cupy_training_on_a_side_stream():
    rng = np.random.default_rng(13)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.asarray(rng.standard_normal((8, 16, 32, 32)).astype(np.float32))
        rm, rv = cupy.zeros(16, np.float32), cupy.ones(16, np.float32)
        y = _cuda.batch_norm_forward(x, rm, rv, None, None, True, 0.1, 1e-5)
    stream.synchronize()
    x64 = cupy.asnumpy(x).astype(np.float64)
    ref = (x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(x64.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(cupy.asnumpy(y), ref, rtol=1e-5, atol=1e-5)


def test_is_gpu_array():
    assert _cuda.is_gpu_array(cupy.zeros(2))
    assert not _cuda.is_gpu_array(np.zeros(2))


# ------------------------------------------------------------------------------------ torch tensors

@needs_torch
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 5, 7), (2, 3, 3, 4, 5), (8, 16, 32, 32)], ids=str)
@pytest.mark.parametrize("x_dtype", TORCH_DTYPES)
def test_torch_matches_torch_and_kernel_arithmetic(x_dtype, shape):
    p_dtype = "float64" if x_dtype == "float64" else "float32"  # torch's mixed-precision rule
    xs, p = make_inputs(shape, x_dtype, p_dtype, np.random.default_rng(4))
    x = _torch(xs["x"], x_dtype)
    params = {k: _torch(v, p_dtype) for k, v in p.items()}
    y = _cuda.batch_norm_forward(x, params["mean"], params["var"], params["weight"], params["bias"],
                                 False, 0.1, 1e-5)
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.dtype == x.dtype and y.shape == x.shape
    y64 = y.double().cpu().numpy()
    _assert_exact(y64, xs["x"], p, 1e-5, x_dtype)
    ref = torch.nn.functional.batch_norm(x, params["mean"], params["var"], params["weight"], params["bias"],
                                         training=False, eps=1e-5).double().cpu().numpy()
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-22, "float64": 2.0**-50}[x_dtype]
    np.testing.assert_allclose(y64, ref, rtol=2 * eps, atol=4 * eps)


@needs_torch
def test_torch_bf16_parameters_and_f64_input_with_f32_layer():
    xs, p = make_inputs((3, 4, 10), "bfloat16", "bfloat16", np.random.default_rng(5))
    x = _torch(xs["x"], "bfloat16")
    params = [_torch(p[k], "bfloat16") for k in ("mean", "var", "weight", "bias")]
    y = _cuda.batch_norm_forward(x, *params, False, 0.1, 1e-5)
    _assert_exact(y.double().cpu().numpy(), xs["x"], p, 1e-5, "bfloat16")
    xs, p = make_inputs((3, 4, 10), "float64", "float32", np.random.default_rng(6))
    params = [_torch(p[k], "float32") for k in ("mean", "var", "weight", "bias")]
    y = _cuda.batch_norm_forward(_torch(xs["x"], "float64"), *params, False, 0.1, 1e-5)
    assert y.dtype == torch.float64
    _assert_exact(y.cpu().numpy(), xs["x"], p, 1e-5, "float64")


@needs_torch
def test_torch_runs_on_torchs_current_stream_without_host_sync():
    xs, p = make_inputs((16, 32, 28, 28), "float16", "float32", np.random.default_rng(7))
    x = _torch(xs["x"], "float16")
    params = [_torch(p[k], "float32") for k in ("mean", "var", "weight", "bias")]
    _cuda.batch_norm_forward(x, *params, False, 0.1, 1e-5)  # compile outside the checked region
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # any torch-initiated host sync raises
    try:
        with torch.cuda.stream(side):
            y = _cuda.batch_norm_forward(x, *params, False, 0.1, 1e-5)
            y2 = y * 1  # torch work ordered after ours on the same stream
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    _assert_exact(y2.double().cpu().numpy(), xs["x"], p, 1e-5, "float16")


@needs_torch
def test_torch_non_contiguous_and_requires_grad_params():
    xs, p = make_inputs((4, 6, 5, 3), "float32", "float32", np.random.default_rng(8))
    x = _torch(xs["x"], "float32").permute(0, 1, 3, 2)
    params = [_torch(p[k], "float32").requires_grad_() for k in ("mean", "var", "weight", "bias")]
    y = _cuda.batch_norm_forward(x, *params, False, 0.1, 1e-5)
    _assert_exact(y.double().cpu().numpy(), xs["x"].transpose(0, 1, 3, 2), p, 1e-5, "float32")


@needs_torch
def test_torch_input_with_cupy_parameters():
    xs, p = make_inputs((2, 3, 8), "float32", "float32", np.random.default_rng(9))
    params = [cupy.asarray(p[k].astype(np.float32)) for k in ("mean", "var", "weight", "bias")]
    y = _cuda.batch_norm_forward(_torch(xs["x"], "float32"), *params, False, 0.1, 1e-5)
    assert isinstance(y, torch.Tensor)
    _assert_exact(y.double().cpu().numpy(), xs["x"], p, 1e-5, "float32")


@needs_torch
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (256, 32)), ("BatchNorm1d", (16, 32, 100)),
                                       ("BatchNorm2d", (8, 64, 28, 28)), ("BatchNorm2d", (4, 3, 64, 64)),
                                       ("BatchNorm3d", (2, 4, 6, 8, 10))])
@pytest.mark.parametrize("x_dtype", TORCH_DTYPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_training_matches_torch(cls, shape, x_dtype, momentum):
    """cupybn.batch_norm (training) on CUDA torch tensors against torch's own BatchNorm, 3 steps."""
    import cupybn

    p_dtype = torch.float64 if x_dtype == "float64" else torch.float32
    ref = getattr(torch.nn, cls)(shape[1], momentum=momentum).to(device="cuda", dtype=p_dtype)
    rm, rv = ref.running_mean.clone(), ref.running_var.clone()
    nbt = torch.zeros((), dtype=torch.int64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[x_dtype]
    for _ in range(3):
        x = (torch.randn(shape, device="cuda", generator=gen) * 2 + 1).to(_torch_dtype(x_dtype))
        stats = cupybn.RunningStats.wrap(rm, rv, momentum, nbt, count_batches=True)
        from cupybn import functional as F

        y = F._batch_norm(x, stats, ref.weight.detach(), ref.bias.detach(), True, ref.eps)
        y_ref = ref(x.to(p_dtype) if x_dtype in ("bfloat16", "float16") else x).detach()
        torch.testing.assert_close(y.double(), y_ref.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(rm.double(), ref.running_mean.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv.double(), ref.running_var.double(), rtol=1e-5, atol=1e-6)
        assert int(nbt) == int(ref.num_batches_tracked)


@needs_torch
def test_torch_training_without_host_sync():
    x = torch.randn((16, 32, 28, 28), device="cuda", dtype=torch.float16)
    rm = torch.zeros(32, device="cuda")
    rv = torch.ones(32, device="cuda")
    nbt = torch.zeros((), dtype=torch.int64, device="cuda")
    _cuda.batch_norm_forward(x, rm, rv, None, None, True, None, 1e-5, num_batches_tracked=nbt)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = _cuda.batch_norm_forward(x, rm, rv, None, None, True, None, 1e-5, num_batches_tracked=nbt)
        y2 = y * 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert int(nbt) == 2 and torch.isfinite(y2).all()


# ------------------------------------------------------------------------------------ layer / group / instance norm

_GROUP_TOL = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}


@needs_torch
@pytest.mark.parametrize("shape,normalized", [((4096, 768), (768,)), ((64, 8192), (8192,)), ((6, 7), (7,)),
                                              ((3, 5, 40), (5, 40)), ((4, 20000), (20000,))], ids=str)
@pytest.mark.parametrize("x_dtype", TORCH_DTYPES)
def test_torch_layer_norm_matches_torch(shape, normalized, x_dtype):
    """cupybn.layer_norm on CUDA torch tensors (warp, block, split paths) against torch."""
    import cupybn

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(shape, device="cuda", generator=gen) * 2 + 1).to(_torch_dtype(x_dtype))
    w = torch.randn(normalized, device="cuda", generator=gen).to(x.dtype)
    b = torch.randn(normalized, device="cuda", generator=gen).to(x.dtype)
    y = cupybn.layer_norm(x, normalized, w, b, 1e-5)
    y_ref = torch.nn.functional.layer_norm(x.double(), normalized, w.double(), b.double(), 1e-5)
    tol = _GROUP_TOL[x_dtype]
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)


@needs_torch
@pytest.mark.parametrize("shape,groups", [((8, 64, 28, 28), 32), ((2, 4, 5), 2), ((2, 6, 3000), 1)], ids=str)
@pytest.mark.parametrize("x_dtype", TORCH_DTYPES)
def test_torch_group_norm_matches_torch(shape, groups, x_dtype):
    import cupybn

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = (torch.randn(shape, device="cuda", generator=gen) * 2 + 1).to(_torch_dtype(x_dtype))
    w = torch.randn(shape[1], device="cuda", generator=gen)
    b = torch.randn(shape[1], device="cuda", generator=gen)
    y = cupybn.group_norm(x, groups, w, b, 1e-5)
    y_ref = torch.nn.functional.group_norm(x.double(), groups, w.double(), b.double(), 1e-5)
    tol = _GROUP_TOL[x_dtype]
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)


@needs_torch
@pytest.mark.parametrize("shape", [(8, 16, 32, 32), (3, 4, 9), (2, 3, 3, 4, 5), (2, 2, 20000)], ids=str)
@pytest.mark.parametrize("x_dtype", TORCH_DTYPES)
def test_torch_instance_norm_matches_torch(shape, x_dtype):
    """cupybn.instance_norm with running statistics against torch, 3 steps, no host sync needed."""
    import cupybn

    gen = torch.Generator(device="cuda").manual_seed(3)
    c = shape[1]
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    rm_ref, rv_ref = rm.double(), rv.double()
    w = torch.randn(c, device="cuda", generator=gen)
    b = torch.randn(c, device="cuda", generator=gen)
    tol = _GROUP_TOL[x_dtype]
    for _ in range(3):
        x = (torch.randn(shape, device="cuda", generator=gen) * 2 + 1).to(_torch_dtype(x_dtype))
        y = cupybn.instance_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        y_ref = torch.nn.functional.instance_norm(x.double(), rm_ref, rv_ref, w.double(), b.double(), True, 0.1, 1e-5)
        torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-5, atol=1e-6)


def test_quantize_helper_is_shared():  # keeps the import list honest if the emulator module changes
    assert quantize(np.array([1.0]), "float32")[1][0] == 1.0


# ------------------------------------------------------------------------------------ BatchNorm backward (issue 6)

@needs_torch
@pytest.mark.parametrize("shape", [(64, 32), (4, 3, 17), (8, 16, 14, 14), (2, 3, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("x_dtype", TORCH_DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_torch_batch_norm_backward_matches_autograd(x_dtype, shape, training):
    """cupybn.native forward + backward on CUDA tensors vs torch autograd of F.batch_norm."""
    from cupybn import native

    gen = torch.Generator(device="cuda").manual_seed(3)
    c = shape[1]
    dt = _torch_dtype(x_dtype)
    pdt = torch.float64 if x_dtype == "float64" else torch.float32
    x = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.float64) * 2 + 0.5).to(dt)
    dy = torch.randn(shape, device="cuda", generator=gen, dtype=torch.float64).to(dt)
    w = torch.randn(c, device="cuda", generator=gen, dtype=pdt)
    b = torch.randn(c, device="cuda", generator=gen, dtype=pdt)
    rm, rv = torch.randn(c, device="cuda", dtype=pdt) * 0.1, torch.rand(c, device="cuda", dtype=pdt) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y, save_mean, save_invstd = native.native_batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5)
    dx, dw, db = native.batch_norm_backward(dy, x, w, rm, rv, save_mean, save_invstd, training, 1e-5,
                                            (True, True, True))
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yr = torch.nn.functional.batch_norm(xr, rm_t, rv_t, wr, br, training, 0.1, 1e-5)
    yr.backward(dy)
    tol = {"float16": 2e-2, "bfloat16": 1e-1, "float32": 1e-4, "float64": 1e-10}[x_dtype]
    assert dx.dtype == x.dtype and dw.dtype == w.dtype and db.dtype == w.dtype
    torch.testing.assert_close(y.double(), yr.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), xr.grad.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(dw.double(), wr.grad.double(), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(db.double(), br.grad.double(), rtol=tol, atol=tol * 10)


def test_cupy_batch_norm_backward_is_bitwise_repeatable():
    from cupybn import native

    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.standard_normal((16, 8, 33, 33)).astype(np.float32))
    dy = cupy.asarray(rng.standard_normal((16, 8, 33, 33)).astype(np.float32))
    w = cupy.asarray(rng.standard_normal(8).astype(np.float32))
    _, m, i = native.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    first = native.batch_norm_backward(dy, x, w, None, None, m, i, True, 1e-5, (True, True, True))
    for _ in range(3):
        again = native.batch_norm_backward(dy, x, w, None, None, m, i, True, 1e-5, (True, True, True))
        for a, b in zip(first, again):
            assert bool((a == b).all())
