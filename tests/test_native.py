"""cupybn.native: forward with saved statistics, and the backward of every norm (CPU reference path).

Compared with the float64 oracles (tests/oracle.py for the forward, tests/oracle_backward.py for
the backward, itself checked against central differences) for NumPy, torch CPU and
array-api-strict inputs, every output mask, eval-mode batch norm, instance norm, and narrow
inputs (float16 / bfloat16) with float32 parameters.
"""
from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

import oracle
import oracle_backward as ob
from conftest import (assert_close, make_affine, make_input, require, round_to, to_backend,
                      to_f64, to_numpy, is_backend, dtype_name, torch)

import cupybn
from cupybn import native

# norm -> (input shape, parameter shape)
CASES = {
    "batch_train": ((4, 3, 5), (3,)),
    "batch_flat": ((6, 3), (3,)),          # (N, C): the L == 1 view
    "batch_eval": ((4, 3, 2, 3), (3,)),
    "instance": ((3, 4, 6), (4,)),
    "instance_eval": ((2, 3, 5), (3,)),
    "layer": ((2, 3, 4, 5), (4, 5)),
    "group": ((3, 6, 2, 3), (6,)),
}
GROUPS = 3
EPS = 1e-5


def _param_dtype(dtype):
    return "float32" if dtype in ("float16", "bfloat16") else dtype


class Case:
    """Random inputs for one norm, as float64 NumPy values and as ``backend`` arrays."""

    def __init__(self, norm, backend, dtype, rng, affine=True):
        shape, pshape = CASES[norm]
        pdt = _param_dtype(dtype)
        self.norm, self.backend, self.dtype, self.pdt = norm, backend, dtype, pdt
        self.x = make_input(rng, shape, dtype)
        self.dy = round_to(rng.standard_normal(shape), dtype)
        if affine:
            self.w = round_to(rng.uniform(0.5, 1.5, size=pshape), pdt)
            self.b = round_to(rng.uniform(-0.5, 0.5, size=pshape), pdt)
        else:
            self.w = self.b = None
        c = shape[1]
        self.rm = round_to(rng.uniform(-1, 1, size=c), pdt)
        self.rv = round_to(rng.uniform(0.5, 2.0, size=c), pdt)

    def arr(self, a, param=False):
        if a is None:
            return None
        return to_backend(a, self.backend, self.pdt if param else self.dtype)

    def forward(self, running=True):
        """``(output, saved_a, saved_b, running_mean_arr, running_var_arr)`` from cupybn.native."""
        x, w, b = self.arr(self.x), self.arr(self.w, True), self.arr(self.b, True)
        rm = self.arr(self.rm, True) if running else None
        rv = self.arr(self.rv, True) if running else None
        n = self.norm
        if n in ("batch_train", "batch_flat"):
            out = native.native_batch_norm(x, w, b, rm, rv, True, 0.1, EPS)
        elif n == "batch_eval":
            out = native.native_batch_norm(x, w, b, rm, rv, False, 0.1, EPS)
        elif n == "instance":
            out = native.native_instance_norm(x, w, b, rm, rv, True, 0.1, EPS)
        elif n == "instance_eval":
            out = native.native_instance_norm(x, w, b, rm, rv, False, 0.1, EPS)
        elif n == "layer":
            out = native.native_layer_norm(x, CASES[n][1], w, b, EPS)
        else:
            out = native.native_group_norm(x, GROUPS, w, b, EPS)
        return (*out, rm, rv)

    def backward(self, saved_a, saved_b, mask=(True, True, True)):
        x, w, dy = self.arr(self.x), self.arr(self.w, True), self.arr(self.dy)
        rm, rv = self.arr(self.rm, True), self.arr(self.rv, True)
        n = self.norm
        if n in ("batch_train", "batch_flat"):
            return native.batch_norm_backward(dy, x, w, None, None, saved_a, saved_b, True, EPS, mask)
        if n == "batch_eval":
            return native.batch_norm_backward(dy, x, w, rm, rv, saved_a, saved_b, False, EPS, mask)
        if n == "instance":
            return native.instance_norm_backward(dy, x, w, None, None, saved_a, saved_b, True, EPS,
                                                 mask)
        if n == "instance_eval":
            return native.instance_norm_backward(dy, x, w, rm, rv, saved_a, saved_b, False, EPS,
                                                 mask)
        if n == "layer":
            return native.layer_norm_backward(dy, x, CASES[n][1], saved_a, saved_b, w,
                                              self.arr(self.b, True), mask)
        return native.group_norm_backward(dy, x, saved_a, saved_b, w, GROUPS, mask)

    def oracle_forward(self):
        n = self.norm
        if n.startswith("batch"):
            y, _, _ = oracle.batch_norm(self.x, self.rm, self.rv, self.w, self.b,
                                        n != "batch_eval", 0.1, EPS)
        elif n.startswith("instance"):
            y, _, _ = oracle.instance_norm(self.x, self.rm, self.rv, self.w, self.b,
                                           n == "instance", 0.1, EPS)
        elif n == "layer":
            y = oracle.layer_norm(self.x, CASES[n][1], self.w, self.b, EPS)
        else:
            y = oracle.group_norm(self.x, GROUPS, self.w, self.b, EPS)
        return y

    def oracle_stats(self):
        """float64 ``(mean, invstd)`` as the saved statistics (flattened), or None in eval."""
        x, n = self.x, self.norm
        if n in ("batch_eval", "instance_eval"):
            return None
        if n.startswith("batch"):
            axes = (0,) + tuple(range(2, x.ndim))
            return x.mean(axis=axes), 1 / np.sqrt(x.var(axis=axes) + EPS)
        if n == "instance":
            xr = x.reshape(x.shape[0] * x.shape[1], -1)
        elif n == "layer":
            xr = x.reshape(-1, int(np.prod(CASES[n][1])))
        else:
            xr = x.reshape(x.shape[0] * GROUPS, -1)
        return xr.mean(axis=1), 1 / np.sqrt(xr.var(axis=1) + EPS)

    def oracle_backward(self):
        n = self.norm
        if n in ("batch_train", "batch_flat"):
            return ob.batch_norm_backward(self.dy, self.x, self.w, True, eps=EPS)
        if n == "batch_eval":
            return ob.batch_norm_backward(self.dy, self.x, self.w, False, self.rm, self.rv, EPS)
        if n == "instance":
            return ob.instance_norm_backward(self.dy, self.x, self.w, True, eps=EPS)
        if n == "instance_eval":
            return ob.instance_norm_backward(self.dy, self.x, self.w, False, self.rm, self.rv, EPS)
        if n == "layer":
            return ob.layer_norm_backward(self.dy, self.x, CASES[n][1], self.w, EPS)
        return ob.group_norm_backward(self.dy, self.x, GROUPS, self.w, EPS)


def _tol(dtype):
    # narrow inputs: grad_input rounded to the input dtype; parameter grads are float32 sums of
    # products of rounded values
    return {"float16": 4, "bfloat16": 4, "float32": 2, "float64": 10}[dtype]


# ----------------------------------------------------------------------------- oracle self-check

@pytest.mark.parametrize("norm", list(CASES))
def test_oracle_backward_matches_central_differences(norm, rng):
    """The backward oracle is the derivative of the forward oracle (tests/oracle.py)."""
    case = Case(norm, "numpy", "float64", rng)
    case.x = case.x[:2] if norm != "layer" else case.x[:1]  # keep the finite-difference loop short
    case.dy = case.dy[:case.x.shape[0]]

    def fwd_x(x):
        c = Case.__new__(Case)
        c.__dict__.update(case.__dict__, x=x)
        return c.oracle_forward()

    def fwd_w(w):
        c = Case.__new__(Case)
        c.__dict__.update(case.__dict__, w=w)
        return c.oracle_forward()

    dx, dw, db = case.oracle_backward()
    np.testing.assert_allclose(dx, ob.numerical_gradient(fwd_x, case.x, case.dy), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, ob.numerical_gradient(fwd_w, case.w, case.dy), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, case.dy.sum(axis=tuple(range(case.dy.ndim - case.w.ndim)) if norm == "layer"
                                                else (0,) + tuple(range(2, case.dy.ndim))), rtol=1e-12)


# ------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm", list(CASES))
def test_forward_output_and_saved_statistics(norm, dtype, backend, rng):
    require(backend, dtype)
    case = Case(norm, backend, dtype, rng)
    y, a, b, _, _ = case.forward()
    assert is_backend(y, backend) and dtype_name(y) == dtype
    assert_close(y, case.oracle_forward(), dtype, "output", k=3)
    stats = case.oracle_stats()
    if stats is None:  # eval: ATen's empty saved statistics
        assert tuple(a.shape) == (0,) and tuple(b.shape) == (0,)
        return
    assert dtype_name(a) == dtype and dtype_name(b) == dtype  # accumulation dtype
    assert_close(np.reshape(to_f64(a), -1), stats[0], dtype, "mean", k=3)
    assert_close(np.reshape(to_f64(b), -1), stats[1], dtype, "invstd", k=3)


def test_saved_statistics_shapes_follow_aten(rng):
    x = rng.standard_normal((2, 6, 3, 4))
    assert native.native_batch_norm(x, None, None, None, None, True)[1].shape == (6,)
    assert native.native_instance_norm(x, None, None, None, None)[1].shape == (12,)
    assert native.native_layer_norm(x, (3, 4))[1].shape == (2, 6, 1, 1)
    assert native.native_layer_norm(x, 4)[2].shape == (2, 6, 3, 1)
    assert native.native_group_norm(x, 3)[1].shape == (2, 3)


@pytest.mark.parametrize("norm", ["batch_train", "batch_flat", "batch_eval", "instance",
                                  "instance_eval", "layer", "group"])
def test_forward_output_is_the_functional_output(norm, rng):
    """native_* computes exactly what cupybn.batch_norm / instance_norm / ... compute."""
    case = Case(norm, "numpy", "float32", rng)
    y, _, _, rm, rv = case.forward()
    x, w, b = case.arr(case.x), case.arr(case.w, True), case.arr(case.b, True)
    rm2, rv2 = case.arr(case.rm, True), case.arr(case.rv, True)
    if norm.startswith("batch"):
        ref = cupybn.batch_norm(x, rm2, rv2, w, b, norm != "batch_eval", 0.1, EPS)
    elif norm.startswith("instance"):
        ref = cupybn.instance_norm(x, rm2, rv2, w, b, norm == "instance", 0.1, EPS)
    elif norm == "layer":
        ref = cupybn.layer_norm(x, CASES[norm][1], w, b, EPS)
    else:
        ref = cupybn.group_norm(x, GROUPS, w, b, EPS)
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(rm, rm2)  # running statistics updated the same way
    np.testing.assert_array_equal(rv, rv2)


def test_training_forward_updates_running_stats_in_place(backend, rng):
    require(backend)
    case = Case("batch_train", backend, "float32", rng)
    _, _, _, rm, rv = case.forward()
    _, erm, erv = oracle.batch_norm(case.x, case.rm, case.rv, None, None, True, 0.1, EPS)
    assert_close(rm, erm, "float32")
    assert_close(rv, erv, "float32")
    case = Case("instance", backend, "float32", rng)
    _, _, _, rm, rv = case.forward()
    _, erm, erv = oracle.instance_norm(case.x, case.rm, case.rv, None, None, True, 0.1, EPS)
    assert_close(rm, erm, "float32")
    assert_close(rv, erv, "float32")


# ------------------------------------------------------------------------------------ backward

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm", list(CASES))
def test_backward_matches_oracle(norm, dtype, affine, backend, rng):
    require(backend, dtype)
    case = Case(norm, backend, dtype, rng, affine=affine)
    _, a, b, _, _ = case.forward()
    dx, dw, db = case.backward(a, b)
    edx, edw, edb = case.oracle_backward()
    for got, want, what in ((dx, edx, "grad_input"), (dw, edw, "grad_weight"), (db, edb, "grad_bias")):
        assert is_backend(got, backend), what
        assert dtype_name(got) == dtype, what
        assert_close(got, want, dtype, what, k=_tol(dtype))
    assert tuple(dw.shape) == CASES[norm][1]


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("norm", list(CASES))
def test_output_mask(norm, mask, rng):
    case = Case(norm, "numpy", "float64", rng)
    _, a, b, _, _ = case.forward()
    full = case.backward(a, b)
    got = case.backward(a, b, mask)
    for m, g, f in zip(mask, got, full):
        if m:
            np.testing.assert_array_equal(g, f)
        else:
            assert g is None


@pytest.mark.parametrize("norm", list(CASES))
@pytest.mark.parametrize("dtype,backend", [("float16", "numpy"), ("float16", "torch"),
                                           ("bfloat16", "torch")])
def test_mixed_precision_backward(norm, dtype, backend, rng):
    """float16 / bfloat16 input and grad_output with float32 parameters (PyTorch's mixed rule)."""
    require(backend, dtype)
    case = Case(norm, backend, dtype, rng)
    y, a, b, _, _ = case.forward()
    assert dtype_name(y) == dtype
    if a.shape[0]:
        assert dtype_name(a) == "float32"
    dx, dw, db = case.backward(a, b)
    edx, edw, edb = case.oracle_backward()
    assert dtype_name(dx) == dtype and dtype_name(dw) == "float32" and dtype_name(db) == "float32"
    assert_close(dx, edx, dtype, "grad_input", k=6)
    # float32 sums of values rounded to the narrow dtype: a few narrow-dtype ulps of the scale
    assert_close(dw, edw, dtype, "grad_weight", k=8, scale=max(1.0, float(np.abs(edw).max())))
    assert_close(db, edb, "float32", "grad_bias", k=4)


def test_eval_batch_norm_backward_is_the_diagonal(rng):
    """With running statistics the input gradient is dy * weight / sqrt(running_var + eps)."""
    case = Case("batch_eval", "numpy", "float64", rng)
    dx, _, _ = case.backward(np.empty(0), np.empty(0))
    expected = case.dy * (case.w / np.sqrt(case.rv + EPS)).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(dx, expected, rtol=1e-14)


def test_parameter_gradients_keep_the_parameter_dtype(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    w64 = np.ones(3)
    y, m, s = native.native_batch_norm(x, w64, None, None, None, True)
    dx, dw, db = native.batch_norm_backward(np.ones_like(x), x, w64, None, None, m, s, True)
    assert dx.dtype == np.float32 and dw.dtype == np.float64 and db.dtype == np.float64
    dx, dw, db = native.batch_norm_backward(np.ones_like(x), x, None, None, None, m, s, True)
    assert dw.dtype == np.float32 and db.dtype == np.float32  # no weight: the input's dtype


def test_eps_zero_constant_channel_has_zero_input_gradient():
    x = np.ones((4, 2, 3))
    x[:, 1] = np.arange(12.0).reshape(4, 3)
    dy = np.arange(24.0).reshape(4, 2, 3)
    y, m, s = native.native_batch_norm(x, None, None, None, None, True, 0.1, 0.0)
    assert s[0] == 0 and np.all(y[:, 0] == 0)
    dx, dw, db = native.batch_norm_backward(dy, x, None, None, None, m, s, True, 0.0)
    assert np.all(dx[:, 0] == 0) and np.all(np.isfinite(dx))
    edx, _, _ = ob.batch_norm_backward(dy, x, None, True, eps=0.0)
    np.testing.assert_allclose(dx, edx, atol=1e-12)


def test_empty_batch():
    x = np.zeros((0, 3, 4), dtype=np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, m, s = native.native_batch_norm(x, None, None, rm, rv, True)
    assert y.shape == x.shape and m.shape == (3,)
    assert np.all(rm == 0) and np.all(rv == 1)
    dx, dw, db = native.batch_norm_backward(x, x, np.ones(3, np.float32), None, None, m, s, True)
    assert dx.shape == x.shape and np.all(dw == 0) and np.all(db == 0)
    y, mean, rstd = native.native_layer_norm(x, 4)
    dx, dw, db = native.layer_norm_backward(x, x, 4, mean, rstd, np.ones(4), None)
    assert dx.shape == x.shape and dw.shape == (4,) and np.all(db == 0)
    y, mean, rstd = native.native_group_norm(x, 3)
    dx, dw, db = native.group_norm_backward(x, x, mean, rstd, None, 3)
    assert dx.shape == x.shape and dw.shape == (3,)


def test_torch_parameters_that_require_grad(has_torch, rng):
    """torch arguments with autograd history are read, not differentiated; in-place updates land."""
    x = torch.randn(4, 3, 5)
    w = torch.ones(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y, m, s = native.native_batch_norm(x, w, None, rm, rv, True)
    assert not y.requires_grad and rm.abs().sum() > 0
    dx, dw, db = native.batch_norm_backward(torch.ones_like(x), x, w, None, None, m, s, True)
    assert dx.shape == x.shape and dw.shape == (3,)


def test_errors(rng):
    x = rng.standard_normal((4, 3, 5))
    y, m, s = native.native_batch_norm(x, None, None, None, None, True)
    with pytest.raises(ValueError, match="grad_output"):
        native.batch_norm_backward(x[:2], x, None, None, None, m, s, True)
    with pytest.raises(ValueError, match="output_mask"):
        native.batch_norm_backward(x, x, None, None, None, m, s, True, 1e-5, (True, True))
    with pytest.raises(ValueError, match="save_mean"):
        native.batch_norm_backward(x, x, None, None, None, m[:2], s, True)
    with pytest.raises(ValueError, match="running_mean"):
        native.batch_norm_backward(x, x, None, None, None, m, s, False)
    with pytest.raises(ValueError, match="more than 1"):
        native.native_batch_norm(x[:1, :, :1], None, None, None, None, True)
    with pytest.raises(ValueError, match="weight"):
        native.batch_norm_backward(x, x, np.ones(4), None, None, m, s, True)
    with pytest.raises(ValueError, match="rstd"):
        _, mean, rstd = native.native_group_norm(x, 3)
        native.group_norm_backward(x, x, mean, rstd[:1], None, 3)
    with pytest.raises(TypeError, match="grad_output"):
        native.layer_norm_backward(np.ones((4, 3, 5), dtype=np.int64), x, 5, m, s)


def test_exports():
    for name in native.__all__:
        assert getattr(cupybn, name) is getattr(native, name)
        assert name in cupybn.__all__


def test_import_cupybn_does_not_import_torch():
    code = "import sys, cupybn, cupybn.native; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_large_input_blocked_forward_and_backward(norm, rng):
    """Inputs above the reference path's block size (threaded, blocked moments) still match."""
    x = make_input(rng, (2, 4, 40000), "float32")
    dy = round_to(rng.standard_normal(x.shape), "float32")
    w = round_to(rng.uniform(0.5, 1.5, size=4), "float32")
    x32, dy32, w32 = (a.astype(np.float32) for a in (x, dy, w))
    if norm == "batch":
        _, m, s = native.native_batch_norm(x32, w32, None, None, None, True)
        got = native.batch_norm_backward(dy32, x32, w32, None, None, m, s, True)
        want = ob.batch_norm_backward(dy, x, w, True)
    elif norm == "group":
        _, m, s = native.native_group_norm(x32, 2, w32)
        got = native.group_norm_backward(dy32, x32, m, s, w32, 2)
        want = ob.group_norm_backward(dy, x, 2, w)
    else:
        _, m, s = native.native_layer_norm(x32, 40000)
        got = native.layer_norm_backward(dy32, x32, 40000, m, s)
        want = ob.layer_norm_backward(dy, x, 40000)
    for g, e, what in zip(got, want, ("grad_input", "grad_weight", "grad_bias")):
        # float32 sums over 80000 values: relative error grows like sqrt(n) * 2**-24
        assert_close(g, e, "float32", what, k=5, scale=max(1.0, float(np.abs(e).max())))
