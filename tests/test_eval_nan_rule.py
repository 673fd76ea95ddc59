"""Eval with a running variance of 0 and ``eps == 0`` (issue 12, item 4): torch's values, element by element.

torch 2.13's CPU eval kernel for a contiguous input computes, per channel and in the accumulation
("opmath") dtype,

    alpha = invstd * weight,  beta = bias - mean * alpha,  y = x * alpha + beta

so with ``invstd = 1 / sqrt(0 + 0) = inf`` the output is NOT ``(x - mean) * inf``: with
``mean == 0`` (or ``weight == 0``) ``beta`` is NaN and every element is NaN; with ``mean > 0`` and
``weight > 0``, ``beta = -inf``, so ``x < 0`` gives ``-inf`` and ``x >= 0`` NaN (``0 * inf`` and
``inf - inf``); and so on by the signs. The backward: ``grad_input = dy * (invstd * weight)``,
``grad_weight = sum(dy * (x - mean)) * invstd`` (NaN where that sum is 0, else +-inf),
``grad_bias = sum(dy)``. Instance norm is batch norm on the ``(1, N*C, *)`` view with the running
statistics and the affine parameters repeated per sample, so its ``grad_weight`` is the sum over
the samples of the per-sample ``sum(dy * (x - mean)) * invstd``: ``inf + -inf = NaN`` where two
samples' sums have opposite signs, where batch norm gives +-inf.

Each case is checked against an explicit float64 computation of those formulas (exact here: the
data are small integers) and, where torch is installed, against torch itself. The GPU kernels are
checked the same way in the emulator (tests/test_cuda_batch_norm_eval.py, test_cuda_eval_nan_rule).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require, to_backend, to_f64, torch

import cupybn
from cupybn import native

N, C, L = 2, 5, 4
# Four channels with a running variance of 0 (means 0, +1, -1, +0.5) and one ordinary channel.
RM = np.array([0.0, 1.0, -1.0, 0.5, 0.0])
RV = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
W = np.array([1.0, 2.0, -1.0, 0.0, 1.5])
B = np.array([0.0, 0.5, -2.0, 1.0, 0.25])


def _data():
    rng = np.random.default_rng(19)
    x = rng.integers(-2, 4, (N, C, L)).astype(np.float64)
    dy = rng.integers(-1, 3, (N, C, L)).astype(np.float64)
    d = (x - RM[None, :, None]) * dy
    per_batch, per_sample = d.sum(axis=(0, 2))[:4], d.sum(axis=2)[:, :4]
    # the cases this file is about: sums of 0 (NaN), > 0 and < 0 (+-inf) among the zero-variance
    # channels, and channels whose per-sample sums have opposite signs (instance norm: NaN)
    assert (per_batch == 0).any() and (per_batch > 0).any() and (per_batch < 0).any()
    assert ((per_sample[0] * per_sample[1] < 0) & (per_batch != 0)).any()
    return x, dy


X, DY = _data()


def expected_forward(affine):
    """torch's eval forward: x * alpha + beta (float64; every operation exact or non-finite here)."""
    w = W if affine else np.ones(C)
    b = B if affine else np.zeros(C)
    with np.errstate(all="ignore"):
        alpha = 1.0 / np.sqrt(RV + 0.0) * w
        beta = b - RM * alpha
        return X * alpha[None, :, None] + beta[None, :, None]


def expected_backward(affine, instance):
    """torch's eval backward: (grad_input, grad_weight, grad_bias)."""
    w = W if affine else np.ones(C)
    with np.errstate(all="ignore"):
        invstd = 1.0 / np.sqrt(RV + 0.0)
        dx = DY * (invstd * w)[None, :, None]
        dotp = ((X - RM[None, :, None]) * DY).sum(axis=2)  # (N, C)
        if instance:
            gw = (dotp * invstd[None, :]).sum(axis=0)
        else:
            gw = dotp.sum(axis=0) * invstd
    return dx, gw, DY.sum(axis=(0, 2))


def test_the_explicit_values():
    """The rule spelled out on x = (-1, 0, 1): mean 0 -> NaN everywhere; mean 1 -> beta = -inf:
    (-inf, NaN, NaN); mean -1 -> beta = +inf: (NaN, NaN, inf); a finite channel is unchanged."""
    x = np.array([[[-1.0, 0.0, 1.0]] * 4])
    y = cupybn.batch_norm(x, np.array([0.0, 1.0, -1.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0]),
                          training=False, eps=0.0)
    nan, inf = np.nan, np.inf
    np.testing.assert_array_equal(y[0], [[nan, nan, nan], [-inf, nan, nan], [nan, nan, inf], [-1.0, 0.0, 1.0]])


def _same(got, want, what):
    got = to_f64(got)
    assert got.shape == want.shape, what
    ok = (got == want) | (np.isnan(got) & np.isnan(want))
    assert ok.all(), f"{what}: got {got[~ok].tolist()} where {want[~ok].tolist()} expected (at {np.argwhere(~ok)[:4].tolist()})"


def _pdt(dtype):
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _args(backend, dtype, affine):
    p = _pdt(dtype)
    x = to_backend(X, backend, dtype)
    rm, rv = to_backend(RM, backend, p), to_backend(RV, backend, p)
    w = to_backend(W, backend, p) if affine else None
    b = to_backend(B, backend, p) if affine else None
    return x, rm, rv, w, b


def _torch_forward(dtype, affine, instance):
    p = getattr(torch, _pdt(dtype))
    x = torch.tensor(X, dtype=getattr(torch, dtype), requires_grad=True)
    w = torch.tensor(W, dtype=p, requires_grad=True) if affine else None
    b = torch.tensor(B, dtype=p, requires_grad=True) if affine else None
    fn = torch.nn.functional.instance_norm if instance else torch.nn.functional.batch_norm
    y = fn(x, torch.tensor(RM, dtype=p), torch.tensor(RV, dtype=p), weight=w, bias=b, eps=0.0,
           **({"use_input_stats": False} if instance else {"training": False}))
    y.backward(torch.tensor(DY, dtype=y.dtype))
    return y, x.grad, None if w is None else w.grad, None if b is None else b.grad


DTYPES = ["float16", "bfloat16", "float32", "float64"]


@pytest.mark.parametrize("instance", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["numpy", "torch", "strict"])
def test_forward(backend, dtype, affine, instance):
    require(backend, dtype)
    x, rm, rv, w, b = _args(backend, dtype, affine)
    if instance:
        y = cupybn.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=0.0)
    else:
        y = cupybn.batch_norm(x, rm, rv, w, b, training=False, eps=0.0)
    want = expected_forward(affine)
    _same(y, want, "forward")
    # native_batch_norm / native_instance_norm: the same output
    if instance:
        y2 = native.native_instance_norm(x, w, b, rm, rv, False, 0.1, 0.0)[0]
    else:
        y2 = native.native_batch_norm(x, w, b, rm, rv, False, 0.1, 0.0)[0]
    _same(y2, want, "native forward")
    if torch is not None:
        _same(_torch_forward(dtype, affine, instance)[0], want, "torch forward (the expectation itself)")


@pytest.mark.parametrize("instance", [False, True], ids=["batch", "instance"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["numpy", "torch", "strict"])
def test_backward(backend, dtype, affine, instance):
    require(backend, dtype)
    x, rm, rv, w, b = _args(backend, dtype, affine)
    dy = to_backend(DY, backend, dtype)
    if instance:
        got = native.instance_norm_backward(dy, x, w, rm, rv, None, None, False, 0.0)
    else:
        got = native.batch_norm_backward(dy, x, w, rm, rv, None, None, False, 0.0)
    want = expected_backward(affine, instance)
    for g, e, name in zip(got, want, ("grad_input", "grad_weight", "grad_bias")):
        _same(g, e, name)
    if torch is not None:
        _, gx, gw, gb = _torch_forward(dtype, affine, instance)
        for g, e, name in zip((gx, gw, gb), want, ("torch grad_input", "torch grad_weight", "torch grad_bias")):
            if g is not None:
                _same(g, e, name + " (the expectation itself)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["BatchNorm1d", "InstanceNorm1d"])
def test_torch_modules(kind, dtype):
    """cupybn.torch's drop-in modules in eval give torch.nn's values, forward and backward."""
    require("torch")
    import cupybn.torch as ct

    p = getattr(torch, _pdt(dtype))
    extra = {"track_running_stats": True, "affine": True} if kind.startswith("Instance") else {}
    mods = [getattr(torch.nn, kind)(C, eps=0.0, **extra), getattr(ct, kind)(C, eps=0.0, **extra)]
    outs = []
    for m in mods:
        m.to(p).eval()
        with torch.no_grad():
            m.running_mean.copy_(torch.tensor(RM))
            m.running_var.copy_(torch.tensor(RV))
            m.weight.copy_(torch.tensor(W))
            m.bias.copy_(torch.tensor(B))
        x = torch.tensor(X, dtype=getattr(torch, dtype), requires_grad=True)
        y = m(x)
        y.backward(torch.tensor(DY, dtype=y.dtype))
        outs.append((y, x.grad, m.weight.grad, m.bias.grad))
    ref, got = outs
    for r, g, name in zip(ref, got, ("output", "grad_input", "grad_weight", "grad_bias")):
        _same(g, to_f64(r), f"{kind} {name}")
