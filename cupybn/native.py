"""Forward functions that also return the saved statistics, and the backward of every norm.

Modelled on ATen's ``native_batch_norm`` / ``native_layer_norm`` / ``native_group_norm`` and their
``*_backward``: a training forward returns the per-group ``mean`` and ``invstd`` (``rstd``) it
normalized with, and the backward takes them back, so statistics are never recomputed. This is
the API for users who run their own autograd (CuPy, JAX-style pipelines); :mod:`cupybn.torch`
builds ``torch.autograd.Function`` s on it.

Forward::

    native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum=0.1,
                      eps=1e-5) -> (output, save_mean, save_invstd)            # (C,) each
    native_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats=True,
                         momentum=0.1, eps=1e-5) -> (output, save_mean, save_invstd)  # (N*C,)
    native_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)
        -> (output, mean, rstd)                         # shape input.shape[:-k] + (1,) * k
    native_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5)
        -> (output, mean, rstd)                         # (N, num_groups)

Backward (``output_mask = (grad_input, grad_weight, grad_bias)``; an entry is ``None`` where its
mask is False)::

    batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                        save_invstd, train, eps=1e-5, output_mask=(True, True, True))
    instance_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                           save_invstd, use_input_stats=True, eps=1e-5,
                           output_mask=(True, True, True))
    layer_norm_backward(grad_output, input, normalized_shape, mean, rstd, weight=None, bias=None,
                        output_mask=(True, True, True))
    group_norm_backward(grad_output, input, mean, rstd, weight, num_groups,
                        output_mask=(True, True, True))

Conventions:

* Saved statistics (``save_mean``, ``save_invstd``, ``mean``, ``rstd``) are in the accumulation
  dtype: float32, or float64 for float64 input (ATen's CPU "opmath" type), in the input's framework.
* Batch norm in eval (``training=False``) returns empty ``(0,)`` arrays for ``save_mean`` /
  ``save_invstd``, as ATen's ``native_batch_norm`` does; its backward (``train=False``) then reads
  ``running_mean`` / ``running_var`` instead. Instance norm with ``use_input_stats=False`` is
  batch norm in eval, with the same convention. With ``train=True`` the running statistics are
  not read and may be ``None``.
* ``running_mean`` / ``running_var`` are updated in place by a training forward, exactly as
  :func:`cupybn.batch_norm` / :func:`cupybn.instance_norm` do (``momentum`` must be a float:
  ``momentum=None``'s cumulative factor is the caller's business, as in ATen).
* ``grad_input`` has the input's dtype; ``grad_weight`` / ``grad_bias`` have the dtype of
  ``weight`` (of ``bias`` for ``grad_bias`` when given), else the input's, in the input's
  framework. ``grad_weight`` is returned when asked for even if ``weight`` is None (the gradient
  a weight of ones would get); ``grad_bias`` likewise.
* With ``eps == 0`` a batch-/instance-norm group of variance 0 has ``invstd = 0`` (ATen's rule):
  its ``grad_input`` is 0. In eval (running statistics) a running variance of 0 with ``eps == 0``
  gives ``invstd = inf`` and torch's values: ``grad_input = dy * invstd * weight``, ``grad_weight =
  sum(dy * (x - mean)) * invstd`` (NaN where the sum is 0); instance norm sums ``grad_weight`` per
  sample first, as ATen (opposite signs give NaN).
* An empty input gives an empty ``grad_input`` and zero ``grad_weight`` / ``grad_bias``.

CPU inputs (NumPy, torch CPU, array-api-strict) run the array-API reference backward in
:mod:`cupybn._reference` (:func:`~cupybn._reference.grad_sums`,
:func:`~cupybn._reference.normalize_backward`), written once for every framework. GPU inputs
(CuPy, CUDA torch) run the kernels of :mod:`cupybn._cuda` of the same names
(``native_batch_norm``, ``batch_norm_backward``, ``native_layer_norm``, ...).
"""
from __future__ import annotations

import functools
import math

import array_api_compat

from . import _checks, _dispatch, _reference
from . import functional as F

__all__ = [
    "native_batch_norm", "native_instance_norm", "native_layer_norm", "native_group_norm",
    "batch_norm_backward", "instance_norm_backward", "layer_norm_backward", "group_norm_backward",
]


# ------------------------------------------------------------------------------------- helpers

def _device(x):
    return array_api_compat.device(x)


def _plain(a):
    """``a`` without autograd history: torch parameters that require grad are detached (the
    reference path writes into ``out=`` buffers, which autograd refuses). Other arrays unchanged."""
    return a.detach() if array_api_compat.is_torch_array(a) else a


def _entry(fn=None, *, updates=()):
    """A public entry point: no NumPy floating-point warnings (as :func:`cupybn.functional._quiet`),
    and torch arguments detached (:func:`_plain`).

    ``updates``: the positions of the arguments updated in place (the running statistics, also
    accepted by the names ``running_mean`` / ``running_var``). They are passed as given, so that
    :func:`cupybn._checks.check_writable` sees a tensor that requires grad and refuses it up front,
    as torch's batch norm does.
    """
    if fn is None:
        return functools.partial(_entry, updates=updates)
    quiet = F._quiet(fn)
    if not updates:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return quiet(*(_plain(a) for a in args), **{k: _plain(v) for k, v in kwargs.items()})
        return wrapper

    @functools.wraps(fn)
    def wrapper_updating(*args, **kwargs):
        return quiet(*(a if i in updates else _plain(a) for i, a in enumerate(args)),
                     **{k: v if k in ("running_mean", "running_var") else _plain(v)
                        for k, v in kwargs.items()})
    return wrapper_updating


def _empty_stats(xp, x, acc):
    return xp.empty((0,), dtype=acc, device=_device(x)), xp.empty((0,), dtype=acc, device=_device(x))


def _mask(output_mask):
    mask = tuple(bool(m) for m in output_mask)
    if len(mask) != 3:
        raise ValueError(f"output_mask must have 3 entries (grad_input, grad_weight, grad_bias), "
                         f"got {len(mask)}")
    return mask


def _grad_output(grad_output, x):
    """``grad_output`` checked against the input: floating, same shape, same framework and device."""
    g = _dispatch.as_known_array(grad_output) if _dispatch.is_array(grad_output) else grad_output
    _checks.check_floating(g, "grad_output")
    if tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"grad_output must have the input's shape {tuple(x.shape)}, got {tuple(g.shape)}")
    _checks.check_same_device(x, g, "grad_output")
    if not _dispatch.same_framework(g, x):
        g = _dispatch.convert_like(g, x)
    return g


def _channel_backward_args(grad_output, input, weight, eps, output_mask):
    """``(x, grad_output, mask, eps)`` of a backward on running statistics (batch norm; instance
    norm with ``use_input_stats=False``), checked: input at least 2-D, ``weight`` ``(C,)`` or None,
    ``grad_output`` like the input."""
    x = F._as_input(input)
    mask = _mask(output_mask)
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
    _checks.check_vector(weight, "weight", x.shape[1], x)
    eps = _checks.check_eps(eps)
    return x, _grad_output(grad_output, x), mask, eps


def _stat(a, name, size, x, acc):
    """A saved statistic: ``size`` values (any shape) in ``x``'s framework, as a flat ``acc`` vector."""
    if a is None:
        raise ValueError(f"{name} is required")
    _checks.check_floating(a, name)
    _checks.check_same_device(x, a, name)
    a = F._as_input(a)
    if math.prod(a.shape) != size:
        raise ValueError(f"{name} must have {size} values, got shape {tuple(a.shape)}")
    if not _dispatch.same_framework(a, x):
        a = _dispatch.convert_like(a, x)
    xp = _dispatch.namespace(x)
    return xp.astype(xp.reshape(a, (size,)), acc)


def _grad_dtype(xp, param, x):
    """The dtype of a parameter gradient: ``param``'s (in ``x``'s framework), else ``x``'s."""
    if param is None:
        return x.dtype
    return getattr(xp, _checks.dtype_name(param.dtype), x.dtype)


def _as(xp, a, dtype):
    return xp.astype(a, dtype, copy=False)


def _gpu(name, *args):
    return F._gpu_kernel(name)(*args)


# ----------------------------------------------------------------------------------- batch norm

@_entry(updates=(3, 4))
def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum=0.1,
                      eps=1e-5):
    """Batch norm forward returning ``(output, save_mean, save_invstd)``, as ATen's ``native_batch_norm``.

    Same math, checks and in-place running-stat update as :func:`cupybn.batch_norm` (note the
    ATen argument order: ``weight, bias`` before the running statistics). In training
    ``save_mean`` / ``save_invstd`` are the batch's per-channel mean and ``1/sqrt(var + eps)``
    (``(C,)``, accumulation dtype; ``invstd = 0`` for a zero variance with ``eps == 0``); in eval
    they are empty ``(0,)`` arrays.
    """
    training = _checks.check_bool(training, "training")
    if momentum is not None and type(momentum) is not float:
        momentum = _checks.check_real(momentum, "momentum")
    stats = F._wrap_running_stats(running_mean, running_var, momentum)
    x = F._as_input(input)
    eps = F._check_batch_norm(x, stats, weight, bias, training, eps)
    if training and stats is not None:
        _checks.check_momentum(momentum, allow_none=False)
        stats.check_update()  # writable statistics: before any work
    if _dispatch.route(x) == "gpu":
        return _gpu("native_batch_norm", x, weight, bias, _plain(running_mean), _plain(running_var),
                    training, momentum, eps)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    y, mean, invstd = F._batch_norm_reference(x, stats, weight, bias, training, eps)
    if not training:
        return (y, *_empty_stats(xp, x, acc))
    if mean is None:  # empty batch
        c = x.shape[1]
        return y, xp.zeros((c,), dtype=acc, device=_device(x)), xp.zeros((c,), dtype=acc, device=_device(x))
    return y, mean, invstd


def _bn_backward_3d(g3, x3, x, weight, running_mean, running_var, save_mean, save_invstd, train,
                    eps, mask, weight_per_group=None):
    """Batch-norm backward on a ``(A, C, L)`` view; returns ``(dx3, sum(dy*xhat), sum(dy))`` per group.

    ``weight_per_group`` (``(C,)`` in acc dtype or None) scales ``dx``; entries not asked for by
    ``mask`` are None.
    """
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    groups = x3.shape[1]
    if train:
        mean = _stat(save_mean, "save_mean", groups, x, acc)
        invstd = _stat(save_invstd, "save_invstd", groups, x, acc)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when train=False")
        mean = _stat(running_mean, "running_mean", groups, x, acc)
        invstd = 1.0 / xp.sqrt(_stat(running_var, "running_var", groups, x, acc) + eps)
    need_sums = mask[1] or mask[2] or (train and mask[0])
    sum_dy = sum_dy_xhat = None
    if need_sums:
        sum_dy, sum_dy_xhat = _reference.grad_sums(g3, x3, mean, invstd)
    scale = invstd if weight_per_group is None else invstd * weight_per_group
    dx3 = None
    if mask[0]:
        if train:
            dx3 = _reference.normalize_backward(g3, x3, mean, invstd, scale, sum_dy, sum_dy_xhat,
                                                x.dtype)
        else:
            dx3 = _as(xp, _as(xp, g3, acc) * scale[:, None], x.dtype)
    return dx3, sum_dy_xhat, sum_dy


@_entry
def batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                        save_invstd, train, eps=1e-5, output_mask=(True, True, True)):
    """``(grad_input, grad_weight, grad_bias)`` of batch norm, as ATen's ``native_batch_norm_backward``.

    ``train=True``: the forward normalized with batch statistics, given as ``save_mean`` /
    ``save_invstd`` from :func:`native_batch_norm`. ``train=False``: it normalized with
    ``running_mean`` / ``running_var`` (and ``eps``), which are read here. ``input``: ``(N, C, *)``;
    every vector ``(C,)``. Entries whose ``output_mask`` is False are None.
    """
    train = _checks.check_bool(train, "train")
    x, g, mask, eps = _channel_backward_args(grad_output, input, weight, eps, output_mask)
    c = x.shape[1]
    if _dispatch.route(x) == "gpu":
        return _gpu("batch_norm_backward", g, x, weight, running_mean, running_var, save_mean,
                    save_invstd, train, eps, mask)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    w = None if weight is None else F._param(weight, x, acc)
    if F._numel(x) == 0:
        dx3 = xp.empty_like(x) if mask[0] else None
        zeros = xp.zeros((c,), dtype=acc, device=_device(x))
        sxh, sdy = zeros, zeros
    else:
        dx3, sxh, sdy = _bn_backward_3d(F._channel_stats_view(g), F._channel_stats_view(x), x,
                                        weight, running_mean, running_var, save_mean, save_invstd,
                                        train, eps, mask, w)
    return (None if dx3 is None else xp.reshape(dx3, x.shape),
            _as(xp, sxh, _grad_dtype(xp, weight, x)) if mask[1] else None,
            _as(xp, sdy, _grad_dtype(xp, weight, x)) if mask[2] else None)


# -------------------------------------------------------------------------------- instance norm

@_entry(updates=(3, 4))
def native_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats=True,
                         momentum=0.1, eps=1e-5):
    """Instance norm forward returning ``(output, save_mean, save_invstd)``.

    As ATen, this is batch norm on the ``(1, N*C, *)`` view: with ``use_input_stats`` the saved
    statistics are per ``(sample, channel)``, shape ``(N*C,)`` (sample-major), and the running
    statistics (when given) get the batch mean of the per-instance statistics (``momentum=None``
    means 0). Without ``use_input_stats`` it is :func:`native_batch_norm` in eval (empty saved
    statistics).
    """
    use_input_stats = _checks.check_bool(use_input_stats, "use_input_stats")
    momentum = 0.0 if momentum is None else _checks.check_real(momentum, "momentum")
    stats = F._wrap_running_stats(running_mean, running_var, momentum)
    x = F._as_input(input)
    if not use_input_stats:
        if stats is None:
            raise ValueError("running_mean and running_var must be given when use_input_stats=False")
        return native_batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps)
    eps = F._check_channel_norm(x, stats, weight, bias, eps)
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    _checks.check_more_than_one_value(spatial, x.shape, spatial=True)
    if stats is not None:
        stats.check_update()  # momentum, writable statistics: before any work
    if _dispatch.route(x) == "gpu":
        return _gpu("native_instance_norm", x, weight, bias, _plain(running_mean),
                    _plain(running_var), True, momentum, eps)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    y, mean, invstd = F._instance_norm_reference(x, stats, weight, bias, eps)
    if mean is None:  # empty batch
        zeros = xp.zeros((n * c,), dtype=acc, device=_device(x))
        return y, zeros, zeros
    return y, mean, invstd


@_entry
def instance_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                           save_invstd, use_input_stats=True, eps=1e-5,
                           output_mask=(True, True, True)):
    """``(grad_input, grad_weight, grad_bias)`` of instance norm (see :func:`native_instance_norm`).

    With ``use_input_stats`` the forward's ``save_mean`` / ``save_invstd`` (``(N*C,)``) are used;
    otherwise :func:`batch_norm_backward` with ``train=False`` (running statistics), except that
    ``grad_weight`` / ``grad_bias`` are summed per sample first (see
    :func:`_instance_norm_eval_backward`).
    ``grad_weight`` / ``grad_bias`` are ``(C,)``: the per-instance sums added over the batch.
    """
    if not use_input_stats:
        return _instance_norm_eval_backward(grad_output, input, weight, running_mean, running_var,
                                            eps, output_mask)
    x = F._as_input(input)
    mask = _mask(output_mask)
    eps = F._check_channel_norm(x, None, weight, None, eps)
    g = _grad_output(grad_output, x)
    if _dispatch.route(x) == "gpu":
        return _gpu("instance_norm_backward", g, x, weight, running_mean, running_var, save_mean,
                    save_invstd, True, eps, mask)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    n, c = x.shape[0], x.shape[1]
    if F._numel(x) == 0:
        dx = xp.empty_like(x) if mask[0] else None
        sxh = sdy = xp.zeros((c,), dtype=acc, device=_device(x))
    else:
        spatial = math.prod(x.shape[2:])
        w = None if weight is None else F._per_instance(F._param(weight, x, acc), n)
        dx3, sxh, sdy = _bn_backward_3d(xp.reshape(g, (1, n * c, spatial)),
                                        xp.reshape(x, (1, n * c, spatial)), x, weight, None, None,
                                        save_mean, save_invstd, True, eps, mask, w)
        dx = None if dx3 is None else xp.reshape(dx3, x.shape)
        if mask[1]:
            sxh = xp.sum(xp.reshape(sxh, (n, c)), axis=0)
        if mask[2]:
            sdy = xp.sum(xp.reshape(sdy, (n, c)), axis=0)
    return (dx,
            _as(xp, sxh, _grad_dtype(xp, weight, x)) if mask[1] else None,
            _as(xp, sdy, _grad_dtype(xp, weight, x)) if mask[2] else None)


def _instance_norm_eval_backward(grad_output, input, weight, running_mean, running_var, eps,
                                 output_mask):
    """Instance norm on running statistics: batch norm's eval backward, except that ``grad_weight``
    is summed per sample, as in ATen (batch norm on the ``(1, N*C, *)`` view with the weight
    repeated per sample): ``sum_n(sum(dy * (x - mean)) * invstd)``. That is batch norm's
    ``sum(dy * (x - mean)) * invstd`` up to rounding, but not with ``invstd = inf`` (a running
    variance of 0 with ``eps == 0``): samples whose sums have opposite signs give ``inf + -inf =
    NaN``, where the total's sign would give +-inf. ``grad_input`` does not depend on it."""
    x, g, mask, eps = _channel_backward_args(grad_output, input, weight, eps, output_mask)
    c = x.shape[1]
    if _dispatch.route(x) == "gpu":
        return _gpu("instance_norm_backward", g, x, weight, running_mean, running_var, None, None,
                    False, eps, mask)
    dx = batch_norm_backward(g, x, weight, running_mean, running_var, None, None, False, eps,
                             (mask[0], False, False))[0]
    if not (mask[1] or mask[2]):
        return dx, None, None
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    n = x.shape[0]
    if F._numel(x) == 0:
        sxh = sdy = xp.zeros((c,), dtype=acc, device=_device(x))
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when use_input_stats=False")
        mean = _stat(running_mean, "running_mean", c, x, acc)
        invstd = 1.0 / xp.sqrt(_stat(running_var, "running_var", c, x, acc) + eps)
        spatial = math.prod(x.shape[2:])
        sdy, sxh = _reference.grad_sums(xp.reshape(g, (1, n * c, spatial)),
                                        xp.reshape(x, (1, n * c, spatial)),
                                        F._per_instance(mean, n), F._per_instance(invstd, n))
        sxh = xp.sum(xp.reshape(sxh, (n, c)), axis=0)
        sdy = xp.sum(xp.reshape(sdy, (n, c)), axis=0)
    return (dx,
            _as(xp, sxh, _grad_dtype(xp, weight, x)) if mask[1] else None,
            _as(xp, sdy, _grad_dtype(xp, weight, x)) if mask[2] else None)


# ----------------------------------------------------------------------------------- layer norm

@_entry
def native_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm forward returning ``(output, mean, rstd)``, as ATen's ``native_layer_norm``.

    ``mean`` / ``rstd`` (``1/sqrt(var + eps)``) have ATen's shape ``input.shape[:-k] + (1,) * k``
    with ``k = len(normalized_shape)``, in the accumulation dtype.
    """
    x = F._as_input(input)
    shape = F._check_layer_norm(x, normalized_shape, weight, bias)
    eps = _checks.check_eps(eps, allow_negative=True)
    if _dispatch.route(x) == "gpu":
        return _gpu("native_layer_norm", x, shape, weight, bias, eps)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    k = len(shape)
    stat_shape = tuple(x.shape[:x.ndim - k]) + (1,) * k
    y, mean, invstd = F._layer_norm_reference(x, shape, weight, bias, eps)
    if mean is None:
        return (y, xp.empty(stat_shape, dtype=acc, device=_device(x)),
                xp.empty(stat_shape, dtype=acc, device=_device(x)))
    return y, xp.reshape(mean, stat_shape), xp.reshape(invstd, stat_shape)


@_entry
def layer_norm_backward(grad_output, input, normalized_shape, mean, rstd, weight=None, bias=None,
                        output_mask=(True, True, True)):
    """``(grad_input, grad_weight, grad_bias)`` of layer norm, as ATen's ``native_layer_norm_backward``.

    ``mean`` / ``rstd`` are :func:`native_layer_norm`'s (any shape with one value per row).
    ``grad_weight`` / ``grad_bias`` have shape ``normalized_shape``. ``bias`` is only used for
    its dtype (as in ATen, where it decides whether ``grad_bias`` is defined).
    """
    x = F._as_input(input)
    mask = _mask(output_mask)
    shape = F._check_layer_norm(x, normalized_shape, weight, bias)
    g = _grad_output(grad_output, x)
    if _dispatch.route(x) == "gpu":
        return _gpu("layer_norm_backward", g, x, shape, mean, rstd, weight, bias, mask)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    k = len(shape)
    row = math.prod(shape)
    rows = F._numel(x) // row if row else math.prod(x.shape[:x.ndim - k])
    gw_dtype = _grad_dtype(xp, weight, x)
    gb_dtype = _grad_dtype(xp, bias if bias is not None else weight, x)
    if F._numel(x) == 0:
        zeros = xp.zeros(shape, dtype=acc, device=_device(x))
        return (xp.empty_like(x) if mask[0] else None,
                _as(xp, zeros, gw_dtype) if mask[1] else None,
                _as(xp, zeros, gb_dtype) if mask[2] else None)
    mu = _stat(mean, "mean", rows, x, acc)
    rs = _stat(rstd, "rstd", rows, x, acc)
    x3 = xp.reshape(x, (1, rows, row))
    dy3 = xp.reshape(g, (1, rows, row))
    dx = gw = gb = None
    if mask[0]:
        gg3 = dy3
        if weight is not None:
            gg3 = _as(xp, dy3, acc) * xp.reshape(F._param(weight, x, acc), (row,))
        s_g, s_gxh = _reference.grad_sums(gg3, x3, mu, rs)
        dx = xp.reshape(_reference.normalize_backward(gg3, x3, mu, rs, rs, s_g, s_gxh, x.dtype),
                        x.shape)
    if mask[1]:
        xhat = (xp.astype(x3, acc) - mu[:, None]) * rs[:, None]
        xhat *= _as(xp, dy3, acc)
        gw = _as(xp, xp.reshape(xp.sum(xhat, axis=(0, 1)), shape), gw_dtype)
    if mask[2]:
        gb = _as(xp, xp.reshape(xp.sum(_as(xp, dy3, acc), axis=(0, 1)), shape), gb_dtype)
    return dx, gw, gb


# ----------------------------------------------------------------------------------- group norm

@_entry
def native_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm forward returning ``(output, mean, rstd)``; ``mean`` / ``rstd`` are ``(N, num_groups)``.

    ATen's ``native_group_norm(input, weight, bias, N, C, HxW, group, eps)`` with the redundant
    sizes dropped and :func:`cupybn.group_norm`'s argument order.
    """
    x = F._as_input(input)
    grp = F._check_group_norm(x, num_groups, weight, bias, forward=True)
    eps = _checks.check_eps(eps, allow_negative=True)
    if _dispatch.route(x) == "gpu":
        return _gpu("native_group_norm", x, grp, weight, bias, eps)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    n = x.shape[0]
    y, mean, invstd = F._group_norm_reference(x, grp, weight, bias, eps)
    if mean is None:
        return (y, xp.empty((n, grp), dtype=acc, device=_device(x)),
                xp.empty((n, grp), dtype=acc, device=_device(x)))
    return y, xp.reshape(mean, (n, grp)), xp.reshape(invstd, (n, grp))


@_entry
def group_norm_backward(grad_output, input, mean, rstd, weight, num_groups,
                        output_mask=(True, True, True)):
    """``(grad_input, grad_weight, grad_bias)`` of group norm, as ATen's ``native_group_norm_backward``.

    ``mean`` / ``rstd`` are :func:`native_group_norm`'s (``N * num_groups`` values); ``weight`` is
    ``(C,)`` or None; ``grad_weight`` / ``grad_bias`` are ``(C,)``.
    """
    x = F._as_input(input)
    mask = _mask(output_mask)
    grp = F._check_group_norm(x, num_groups, weight, None, forward=False)
    g = _grad_output(grad_output, x)
    if _dispatch.route(x) == "gpu":
        return _gpu("group_norm_backward", g, x, mean, rstd, weight, grp, mask)
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    n, c = x.shape[0], x.shape[1]
    gdt = _grad_dtype(xp, weight, x)
    if F._numel(x) == 0:
        zeros = xp.zeros((c,), dtype=acc, device=_device(x))
        return (xp.empty_like(x) if mask[0] else None,
                _as(xp, zeros, gdt) if mask[1] else None, _as(xp, zeros, gdt) if mask[2] else None)
    spatial = math.prod(x.shape[2:])
    mu = _stat(mean, "mean", n * grp, x, acc)
    rs = _stat(rstd, "rstd", n * grp, x, acc)
    w = None if weight is None else F._param(weight, x, acc)
    dx = gw = gb = None
    if mask[0]:
        gg = g
        if w is not None:  # the gradient reaching xhat: dy * weight[channel]
            gg = _as(xp, F._channel_stats_view(g), acc) * w[:, None]
        gg3 = xp.reshape(gg, (1, n * grp, (c // grp) * spatial))
        x3 = xp.reshape(x, (1, n * grp, (c // grp) * spatial))
        s_g, s_gxh = _reference.grad_sums(gg3, x3, mu, rs)
        dx = xp.reshape(_reference.normalize_backward(gg3, x3, mu, rs, rs, s_g, s_gxh, x.dtype),
                        x.shape)
    if mask[1] or mask[2]:
        # per-(sample, channel) sums on the (1, N*C, L) view, each channel with its group's stats
        def per_channel(v):
            return xp.reshape(xp.broadcast_to(xp.reshape(v, (n, grp, 1)), (n, grp, c // grp)), (-1,))

        s_dy, s_dyxh = _reference.grad_sums(xp.reshape(g, (1, n * c, spatial)),
                                            xp.reshape(x, (1, n * c, spatial)),
                                            per_channel(mu), per_channel(rs))
        if mask[1]:
            gw = _as(xp, xp.sum(xp.reshape(s_dyxh, (n, c)), axis=0), gdt)
        if mask[2]:
            gb = _as(xp, xp.sum(xp.reshape(s_dy, (n, c)), axis=0), gdt)
    return dx, gw, gb
