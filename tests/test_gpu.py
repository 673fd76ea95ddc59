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


def test_cupy_empty_batch_and_training():
    x = cupy.zeros((0, 3, 4), np.float32)
    vec = cupy.ones(3, np.float32)
    assert _cuda.batch_norm_forward(x, vec, vec, None, None, False, 0.1, 1e-5).shape == (0, 3, 4)
    with pytest.raises(NotImplementedError, match="issue 4"):
        _cuda.batch_norm_forward(cupy.ones((2, 3)), vec, vec, None, None, True, 0.1, 1e-5)


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


def test_quantize_helper_is_shared():  # keeps the import list honest if the emulator module changes
    assert quantize(np.array([1.0]), "float32")[1][0] == 1.0
