"""torch's NaN rule for eval with a running variance of 0 and eps == 0, on the GPU path (emulator).

The values (and why) are in tests/test_eval_nan_rule.py: torch's eval output is
``x * alpha + (bias - mean * alpha)`` per channel, so with ``alpha = inf`` it is NaN where
``x * inf`` meets an infinite constant of the other sign or ``0 * inf``, not ``(x - mean) * inf``.
Here the eval kernel of kernels/batch_norm.cu is launched directly for every input / parameter
dtype, and ``cupybn.batch_norm`` / ``instance_norm`` / the native backward run on the emulated
GPU path (kernels/batch_norm_backward.cu), against the same explicit expectations.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

from cupybn._cuda import planner  # noqa: E402
from test_cuda_batch_norm_eval import get_launcher, quantize, run_eval  # noqa: E402
from test_cuda_batch_norm_train import emulated_gpu  # noqa: E402,F401
from test_eval_nan_rule import B, DY, RM, RV, W, X, expected_backward, expected_forward  # noqa: E402

pytestmark = pytest.mark.emulator

DTYPES = planner.FLOAT_DTYPES


def _same(got, want, what):
    got = np.asarray(got, dtype=np.float64)
    ok = (got == want) | (np.isnan(got) & np.isnan(want))
    assert ok.all(), f"{what}: got {got[~ok].tolist()} where {want[~ok].tolist()} expected"


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("x_dtype,p_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_eval_kernel(x_dtype, p_dtype, affine):
    xq = {"x": quantize(X, x_dtype)[1]}
    pq = {k: quantize(v, p_dtype)[1] for k, v in dict(mean=RM, var=RV, weight=W, bias=B).items()}
    y, _, _ = run_eval(get_launcher(), X.shape, x_dtype, p_dtype, use_weight=affine, use_bias=affine, eps=0.0,
                       data=(xq, pq))
    _same(y, expected_forward(affine), f"{x_dtype}/{p_dtype}")


def test_eval_kernel_on_many_rows():
    """A 1-SM plan: each thread keeps its channel's (torch-form) coefficients over many rows."""
    reps = 300
    x = np.tile(X, (reps, 1, 1))
    xq = {"x": quantize(x, "float32")[1]}
    pq = {k: quantize(v, "float32")[1] for k, v in dict(mean=RM, var=RV, weight=W, bias=B).items()}
    y, _, plan = run_eval(get_launcher(sm_count=1), x.shape, "float32", "float32", eps=0.0, data=(xq, pq))
    assert plan[0].notes["rows_per_thread"] > 1
    _same(y, np.tile(expected_forward(True), (reps, 1, 1)), "many rows")


@pytest.mark.parametrize("instance", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_gpu_path(emulated_gpu, dtype, affine, instance):
    """cupybn's functional and native API with emulator arrays ("on the GPU"): forward and backward."""
    import cupybn
    from cupybn import native

    p = np.float32 if dtype == "float16" else np.dtype(dtype)
    x, dy = emulator.array(X.astype(dtype)), emulator.array(DY.astype(dtype))
    rm, rv = emulator.array(RM.astype(p)), emulator.array(RV.astype(p))
    w = emulator.array(W.astype(p)) if affine else None
    b = emulator.array(B.astype(p)) if affine else None
    if instance:
        y = cupybn.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=0.0)
        grads = native.instance_norm_backward(dy, x, w, rm, rv, None, None, False, 0.0)
    else:
        y = cupybn.batch_norm(x, rm, rv, w, b, training=False, eps=0.0)
        grads = native.batch_norm_backward(dy, x, w, rm, rv, None, None, False, 0.0)
    assert emulated_gpu.plans, "ran on the CPU path"
    _same(y, expected_forward(affine), "forward")
    for g, e, name in zip(grads, expected_backward(affine, instance), ("grad_input", "grad_weight", "grad_bias")):
        _same(g, e, name)


def test_parameter_gradients_narrow_to_bfloat16_by_rounding(emulated_gpu):
    """The per-sample sums of instance norm's eval backward are added in the accumulation dtype and
    then narrowed to the weight's dtype; bfloat16 (no CuPy dtype) is rounded to nearest even on the
    bits, NaN and +-inf kept."""
    from conftest import round_bf16

    from cupybn._cuda import _narrow

    v = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -3.14159, 1e-40, np.inf, -np.inf, np.nan], np.float32)
    bits = np.asarray(_narrow(v, "float32", "bfloat16"))
    assert bits.dtype == np.uint16
    got = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, round_bf16(v))
    assert _narrow(v, "float32", "float32") is v
    assert np.asarray(_narrow(v.astype(np.float64), "float64", "float16")).dtype == np.float16
