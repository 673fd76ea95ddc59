"""NumPy float64 oracle for the backward of the normalization layers, written from the formulas.

Independent of cupybn and of torch: only NumPy, everything in float64, statistics recomputed
from ``x`` with a two-pass variance (never the saved ones). For a group of ``n`` values
normalized as ``xhat = (x - mean) * invstd`` and then ``y = xhat * w + b`` (``w`` may vary inside
the group: layer norm's elementwise weight, group norm's per-channel weight), with
``g = dy * w`` the gradient that reaches ``xhat``::

    dx = invstd * (g - mean(g) - xhat * mean(g * xhat))       (batch statistics)
    dx = invstd * g                                           (fixed running statistics)
    dw = sum(dy * xhat) over everything a weight entry touches
    db = sum(dy)        over the same

The zero-variance rule of batch / instance norm with ``eps == 0`` (``invstd = 0``) gives
``dx = 0`` and ``xhat = 0``. Each function returns ``(dx, dw, db)`` as float64 arrays; ``dw`` /
``db`` are returned even when ``weight`` is None (the gradient a weight of ones / a bias would get).
"""
from __future__ import annotations

import numpy as np

__all__ = ["batch_norm_backward", "instance_norm_backward", "layer_norm_backward",
           "group_norm_backward", "numerical_gradient"]


def _f64(a):
    return None if a is None else np.array(a, dtype=np.float64, copy=True)


def _chan(v, ndim):
    shape = [1] * ndim
    shape[1] = -1
    return np.reshape(v, shape)


def _invstd(var, eps, zero_rule):
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.sqrt(var + eps)
    if zero_rule and eps == 0:
        inv = np.where(var == 0, 0.0, inv)
    return inv


def _batch_stats_backward(g, x, axes, eps, zero_rule):
    """``(dx_before_group_scale, xhat)`` for statistics over ``axes`` (keepdims broadcasting)."""
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    inv = _invstd(var, eps, zero_rule)
    xhat = (x - mean) * inv
    dx = inv * (g - g.mean(axis=axes, keepdims=True)
                - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return dx, xhat


def batch_norm_backward(dy, x, weight=None, training=True, running_mean=None, running_var=None,
                        eps=1e-5):
    """Batch norm over every axis but 1; eval (``training=False``) uses the running statistics."""
    dy, x, w = _f64(dy), _f64(x), _f64(weight)
    nd = x.ndim
    axes = (0,) + tuple(range(2, nd))
    if training:
        dx, xhat = _batch_stats_backward(dy, x, axes, eps, zero_rule=True)
    else:
        inv = 1.0 / np.sqrt(_chan(_f64(running_var), nd) + eps)
        xhat = (x - _chan(_f64(running_mean), nd)) * inv
        dx = dy * inv
    if w is not None:
        dx = dx * _chan(w, nd)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def instance_norm_backward(dy, x, weight=None, use_input_stats=True, running_mean=None,
                           running_var=None, eps=1e-5):
    """Instance norm: statistics per (sample, channel) over the spatial axes."""
    if not use_input_stats:
        return batch_norm_backward(dy, x, weight, False, running_mean, running_var, eps)
    dy, x, w = _f64(dy), _f64(x), _f64(weight)
    nd = x.ndim
    spatial = tuple(range(2, nd))
    dx, xhat = _batch_stats_backward(dy, x, spatial, eps, zero_rule=True)
    if w is not None:
        dx = dx * _chan(w, nd)
    axes = (0,) + spatial
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def layer_norm_backward(dy, x, normalized_shape, weight=None, eps=1e-5):
    """Layer norm over the trailing ``normalized_shape`` axes; ``dw`` / ``db`` of that shape."""
    dy, x, w = _f64(dy), _f64(x), _f64(weight)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    row_axes = tuple(range(x.ndim - k, x.ndim))
    lead = tuple(range(x.ndim - k))
    g = dy if w is None else dy * w
    dx, xhat = _batch_stats_backward(g, x, row_axes, eps, zero_rule=False)
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


def group_norm_backward(dy, x, num_groups, weight=None, eps=1e-5):
    """Group norm: statistics per (sample, group); ``dw`` / ``db`` per channel."""
    dy, x, w = _f64(dy), _f64(x), _f64(weight)
    n, c = x.shape[:2]
    g = dy if w is None else dy * _chan(w, x.ndim)
    grouped = (n, num_groups, -1)
    dx, xhat = _batch_stats_backward(g.reshape(grouped), x.reshape(grouped), (2,), eps,
                                     zero_rule=False)
    xhat = xhat.reshape(x.shape)
    axes = (0,) + tuple(range(2, x.ndim))
    return dx.reshape(x.shape), (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def numerical_gradient(f, a, dy, h=1e-6):
    """Central-difference ``sum(dy * d f(a) / d a)`` for a float64 function ``f`` (oracle self-check)."""
    a = np.array(a, dtype=np.float64, copy=True)
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f(a)
        flat[i] = old - h
        down = f(a)
        flat[i] = old
        gflat[i] = np.sum(dy * (up - down)) / (2 * h)
    return grad
