"""NumPy float64 oracle for the normalization layers, written from the formulas.

Independent of cupybn and of torch: it only uses NumPy, computes everything in
float64 with a two-pass (mean, then mean of squared deviations) variance, and never
mutates its arguments (functions return the new running statistics).

Semantics follow /work/shared/API.md:

* batch norm: statistics over every axis but 1; the biased variance normalizes, the
  unbiased one (divisor n - 1) goes into ``running_var``;
  ``new = (1 - momentum) * old + momentum * batch_stat``. In training, ``eps == 0``
  with a zero batch variance gives ``invstd = 0`` (ATen's rule), i.e. output ``bias``.
  In eval the running statistics are used (a zero running variance with ``eps == 0``
  gives whatever ``(x - mean) / 0`` gives: not finite).
* instance norm: statistics per (sample, channel); the running statistics get the
  mean over the batch of the per-instance statistics; ``momentum=None`` means 0.
* layer norm: statistics over the trailing ``normalized_shape`` axes.
* group norm: statistics per (sample, group).
* an empty batch (N = 0) gives an empty output and leaves running statistics unchanged.

Inputs that were rounded to a narrow dtype (float16/bfloat16/float32) are passed
here as their exact float64 values; the caller rounds the result if it wants to.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "moments",
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "RunningStatsOracle",
    "BatchNormOracle",
    "InstanceNormOracle",
]


def _f64(a):
    if a is None:
        return None
    return np.array(a, dtype=np.float64, copy=True)


def _chan(v, ndim, axis=1):
    """Reshape a per-channel vector so that it broadcasts along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(v, shape)


def moments(x, axes):
    """float64 mean and biased variance over ``axes`` (two passes), keepdims."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    var = (d * d).mean(axis=axes, keepdims=True)
    return mean, var


def _invstd(var, eps, zero_var_gives_zero):
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.sqrt(var + eps)
    if zero_var_gives_zero and eps == 0:
        inv = np.where(var == 0, 0.0, inv)
    return inv


def _affine(y, weight, bias, ndim, axis=1):
    if weight is not None:
        y = y * _chan(_f64(weight), ndim, axis)
    if bias is not None:
        y = y + _chan(_f64(bias), ndim, axis)
    return y


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5):
    """Return ``(y, new_running_mean, new_running_var)`` (float64; stats None if not given)."""
    x = _f64(x)
    rm, rv = _f64(running_mean), _f64(running_var)
    if x.ndim < 2:
        raise ValueError("oracle batch_norm needs at least 2 dimensions")
    C = x.shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    n = x.size // C if C else 0
    if training:
        if n == 0:
            return np.empty_like(x), rm, rv
        mean, var = moments(x, axes)
        inv = _invstd(var, eps, zero_var_gives_zero=True)
        with np.errstate(invalid="ignore"):
            y = (x - mean) * inv
        if rm is not None:
            m = float(momentum)
            rm = (1.0 - m) * rm + m * mean.reshape(C)
        if rv is not None:
            m = float(momentum)
            with np.errstate(divide="ignore", invalid="ignore"):
                unbiased = var.reshape(C) * (n / (n - 1)) if n > 1 else var.reshape(C) * np.inf
            rv = (1.0 - m) * rv + m * unbiased
    else:
        if rm is None or rv is None:
            raise ValueError("oracle batch_norm in eval needs running stats")
        inv = _invstd(_chan(rv, x.ndim), eps, zero_var_gives_zero=False)
        with np.errstate(invalid="ignore"):
            y = (x - _chan(rm, x.ndim)) * inv
    with np.errstate(invalid="ignore"):
        y = _affine(y, weight, bias, x.ndim)
    return y, rm, rv


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """Batched input ``(N, C, *spatial)``. Return ``(y, new_running_mean, new_running_var)``."""
    x = _f64(x)
    rm, rv = _f64(running_mean), _f64(running_var)
    if x.ndim < 3:
        raise ValueError("oracle instance_norm needs (N, C, *spatial)")
    N, C = x.shape[:2]
    momentum = 0.0 if momentum is None else float(momentum)
    if use_input_stats:
        axes = tuple(range(2, x.ndim))
        L = int(np.prod(x.shape[2:]))
        if x.size == 0:
            return np.empty_like(x), rm, rv
        mean, var = moments(x, axes)
        inv = _invstd(var, eps, zero_var_gives_zero=True)
        with np.errstate(invalid="ignore"):
            y = (x - mean) * inv
        if rm is not None:
            rm = (1.0 - momentum) * rm + momentum * mean.reshape(N, C).mean(axis=0)
        if rv is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                unb = var.reshape(N, C) * (L / (L - 1)) if L > 1 else var.reshape(N, C) * np.inf
            rv = (1.0 - momentum) * rv + momentum * unb.mean(axis=0)
    else:
        inv = _invstd(_chan(rv, x.ndim), eps, zero_var_gives_zero=False)
        with np.errstate(invalid="ignore"):
            y = (x - _chan(rm, x.ndim)) * inv
    with np.errstate(invalid="ignore"):
        y = _affine(y, weight, bias, x.ndim)
    return y, rm, rv


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = _f64(x)
    if isinstance(normalized_shape, (int, np.integer)):
        normalized_shape = (int(normalized_shape),)
    k = len(tuple(normalized_shape))
    if tuple(x.shape[x.ndim - k:]) != tuple(normalized_shape):
        raise ValueError("oracle layer_norm: trailing shape mismatch")
    if x.size == 0:
        return np.empty_like(x)
    axes = tuple(range(x.ndim - k, x.ndim))
    mean, var = moments(x, axes)
    inv = _invstd(var, eps, zero_var_gives_zero=False)
    with np.errstate(invalid="ignore"):
        y = (x - mean) * inv
        if weight is not None:
            y = y * _f64(weight)
        if bias is not None:
            y = y + _f64(bias)
    return y


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    x = _f64(x)
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError("oracle group_norm: C % num_groups != 0")
    if x.size == 0:
        return np.empty_like(x)
    xr = x.reshape(N, num_groups, -1)
    mean, var = moments(xr, (2,))
    inv = _invstd(var, eps, zero_var_gives_zero=False)
    with np.errstate(invalid="ignore"):
        y = ((xr - mean) * inv).reshape(x.shape)
        y = _affine(y, weight, bias, x.ndim)
    return y


def _round(a, round_to):
    if a is None or round_to is None:
        return a
    return np.asarray(round_to(a), dtype=np.float64)


class RunningStatsOracle:
    """The update rule of API.md: exponential average, or cumulative (factor 1/num_batches_tracked)
    when ``momentum is None``. ``round_to`` (a function) models storage in a narrow dtype."""

    def __init__(self, num_features, momentum=0.1, round_to=None):
        self.mean = np.zeros(num_features)
        self.var = np.ones(num_features)
        self.num_batches_tracked = 0
        self.momentum = momentum
        self.round_to = round_to

    def factor(self):
        if self.momentum is None:
            return 1.0 / self.num_batches_tracked
        return float(self.momentum)

    def update(self, batch_mean, batch_var_unbiased):
        self.num_batches_tracked += 1
        f = self.factor()
        self.mean = _round((1.0 - f) * self.mean + f * np.asarray(batch_mean, np.float64), self.round_to)
        self.var = _round((1.0 - f) * self.var + f * np.asarray(batch_var_unbiased, np.float64), self.round_to)

    def reset(self):
        self.mean[...] = 0
        self.var[...] = 1
        self.num_batches_tracked = 0


class BatchNormOracle:
    """Module-level batch norm (torch.nn.BatchNormNd semantics)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 weight=None, bias=None, use_bias=True, round_to=None):
        self.C = num_features
        self.eps = eps
        self.momentum = momentum
        self.training = True
        self.weight = (np.ones(num_features) if weight is None else _f64(weight)) if affine else None
        self.bias = ((np.zeros(num_features) if bias is None else _f64(bias))
                     if (affine and use_bias) else None)
        self.track = track_running_stats
        self.stats = RunningStatsOracle(num_features, momentum, round_to) if track_running_stats else None

    @property
    def running_mean(self):
        return None if self.stats is None else self.stats.mean

    @property
    def running_var(self):
        return None if self.stats is None else self.stats.var

    @property
    def num_batches_tracked(self):
        return None if self.stats is None else self.stats.num_batches_tracked

    def __call__(self, x):
        x = _f64(x)
        if self.training and self.track:
            st = self.stats
            st.num_batches_tracked += 1
            f = st.factor()
            y, rm, rv = batch_norm(x, st.mean, st.var, self.weight, self.bias, True, f, self.eps)
            st.mean, st.var = _round(rm, st.round_to), _round(rv, st.round_to)
            return y
        if self.training or not self.track:
            y, _, _ = batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return y
        y, _, _ = batch_norm(x, self.stats.mean, self.stats.var, self.weight, self.bias, False, 0.0, self.eps)
        return y


class InstanceNormOracle:
    """Module-level instance norm (torch.nn.InstanceNormNd semantics). ``batched=False`` inputs
    (C, *spatial) are handled by adding a batch axis of 1."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 weight=None, bias=None, use_bias=True, round_to=None):
        self.C = num_features
        self.eps = eps
        self.momentum = momentum
        self.training = True
        self.weight = (np.ones(num_features) if weight is None else _f64(weight)) if affine else None
        self.bias = ((np.zeros(num_features) if bias is None else _f64(bias))
                     if (affine and use_bias) else None)
        self.track = track_running_stats
        self.round_to = round_to
        if track_running_stats:
            self.running_mean = np.zeros(num_features)
            self.running_var = np.ones(num_features)
            self.num_batches_tracked = 0  # never incremented, as in torch
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def __call__(self, x, batched=True):
        x = _f64(x)
        if not batched:
            x = x[None]
        use_input_stats = self.training or not self.track
        m = 0.0 if self.momentum is None else self.momentum
        if use_input_stats:
            y, rm, rv = instance_norm(x, self.running_mean if self.track else None,
                                      self.running_var if self.track else None,
                                      self.weight, self.bias, True, m, self.eps)
            if self.track:
                self.running_mean, self.running_var = _round(rm, self.round_to), _round(rv, self.round_to)
        else:
            y, _, _ = instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                    False, m, self.eps)
        return y if batched else y[0]
