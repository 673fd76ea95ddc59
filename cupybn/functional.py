"""Functional normalization API with the signatures of ``torch.nn.functional``.

Each function accepts NumPy arrays, torch tensors (CPU or CUDA), CuPy arrays, array-api-strict
arrays or any DLPack producer, and returns the result in the input's framework and dtype.
CPU inputs run on the array-API reference implementation in their own framework
(:mod:`cupybn._reference`); GPU inputs run on the CUDA kernels (:mod:`cupybn._cuda`).

Every argument is checked before any state changes, so a call that raises leaves
``running_mean`` / ``running_var`` exactly as they were.
"""
from __future__ import annotations

import functools
import math
import numbers

import array_api_compat

from . import _checks, _dispatch, _prepared, _reference
from .running_stats import RunningStats

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm"]


def _quiet(fn):
    """Run ``fn`` without NumPy floating-point warnings (NaN/Inf inputs, eps=0), as torch is silent."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _dispatch.quiet_floating_point():
            return fn(*args, **kwargs)
    return wrapper


def _gpu_kernel(name: str):
    """The GPU implementation ``name`` from :mod:`cupybn._cuda`, or NotImplementedError."""
    try:
        from . import _cuda
    except ImportError as exc:  # pragma: no cover - _cuda imports nothing heavy at module level
        raise NotImplementedError(f"the GPU path is not available: {exc}") from exc
    fn = getattr(_cuda, name, None)
    if fn is None:
        raise NotImplementedError(f"{name} on the GPU path (CuPy / CUDA torch input) is not "
                                  f"implemented yet; CPU inputs (NumPy, torch CPU) work")
    return fn


def _plain_input(input):
    """The per-call form of :func:`_as_input` for inputs of ``input``'s signature (its type
    checked once): identity, or torch's ``detach``, or the DLPack import."""
    if array_api_compat.is_numpy_array(input) or array_api_compat.is_cupy_array(input):
        return _same
    if array_api_compat.is_torch_array(input):
        return _dispatch.detached
    return _as_input


def _same(a):
    return a


def _as_input(input):
    x = _dispatch.as_known_array(input) if _dispatch.is_array(input) else input
    _checks.check_floating(x, "input")
    return x


def _param(a, like, acc):
    """A parameter vector in ``like``'s framework and the accumulation dtype ``acc``.

    The cast happens on the owner's side first: the input's framework may lack the parameter's
    dtype (array-api-strict has no float16).
    """
    if type(a) is type(like) and a.dtype == acc and _dispatch.is_host_type(a):
        return a  # the usual case, a NumPy vector of the accumulation dtype: nothing to do
    a = _dispatch.detached(a)
    if not _dispatch.same_framework(a, like):
        owner = _dispatch.namespace(a)
        a = owner.astype(a, getattr(owner, _checks.dtype_name(acc)))
    return _dispatch.namespace(like).astype(_dispatch.convert_like(a, like), acc, copy=False)


def _wrap_running_stats(running_mean, running_var, momentum) -> RunningStats | None:
    """The caller's running-stat arrays as :class:`RunningStats` updated in place (or None).

    ``momentum`` is type-checked here, in eval too (as torch's argument parser does); whether
    ``None`` is allowed and whether the arrays are writable is checked where they would be
    updated (:meth:`RunningStats.check_update`).
    """
    if momentum is not None and type(momentum) is not float:
        momentum = _checks.check_real(momentum, "momentum")
    if running_mean is None and running_var is None:
        return None
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given together (or both None)")
    return RunningStats.wrap(running_mean, running_var, momentum)


def _numel(x) -> int:
    return math.prod(x.shape)


def _channel_stats_view(x):
    """``x`` of shape ``(N, C, *)`` viewed as ``(N, C, L)``."""
    xp = _dispatch.namespace(x)
    n, c = x.shape[0], x.shape[1]
    return xp.reshape(x, (n, c, math.prod(x.shape[2:])))


# ----------------------------------------------------------------------------------- batch norm

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    r"""Batch normalization over dimension 1 of ``input``, as ``torch.nn.functional.batch_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training the statistics are the batch's (biased variance), and ``running_mean`` /
    ``running_var``, when given, are updated in place with ``momentum`` (unbiased variance).
    Otherwise ``running_mean`` / ``running_var`` are used. With ``eps == 0`` a channel whose batch
    variance is 0 normalizes to 0 (ATen's ``invstd = 0`` rule), not NaN.

    Shape:
        - input: ``(N, C)`` or ``(N, C, *)``; running_mean, running_var, weight, bias: ``(C,)``
        - output: same shape and dtype as input
    """
    stats = _wrap_running_stats(running_mean, running_var, momentum)
    return _batch_norm(input, stats, weight, bias, _checks.check_bool(training, "training"), eps)


def _check_channel_norm(x, stats, weight, bias, eps) -> float:
    """Checks shared by batch and instance norm: rank, per-channel vectors, ``eps >= 0``."""
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
    c = x.shape[1]
    if stats is not None:
        _checks.check_vector(stats.mean, "running_mean", c, x)
        _checks.check_vector(stats.var, "running_var", c, x)
    _checks.check_vector(weight, "weight", c, x)
    _checks.check_vector(bias, "bias", c, x)
    return _checks.check_eps(eps)


def _check_batch_norm(x, stats, weight, bias, training, eps):
    eps = _check_channel_norm(x, stats, weight, bias, eps)
    if stats is None and not training:
        raise ValueError("running_mean and running_var must be given when training=False")
    if training:
        _checks.check_more_than_one_value(_numel(x) // x.shape[1] if x.shape[1] else 0, x.shape)
    return eps


def _batch_norm(input, stats: RunningStats | None, weight, bias, training: bool, eps):
    """Batch norm with optional :class:`RunningStats` (updated when ``training``); see :func:`batch_norm`."""
    d = _prepared.describe
    if stats is None:
        key = ("batch_norm", training, d(input), d(weight), d(bias))
    else:
        key = ("batch_norm", training, d(input), d(weight), d(bias), d(stats.mean), d(stats.var),
               d(stats.num_batches_tracked) if stats.count_batches else None, stats.momentum is None)
    call = _prepared.cached(key, _prepare_batch_norm, input, stats, weight, bias, training, eps)
    return call(input, stats, weight, bias, eps)


def _prepare_batch_norm(input, stats, weight, bias, training, eps):
    """The checks a batch-norm signature fixes, once; returns ``call(input, stats, weight, bias, eps)``."""
    x = _as_input(input)
    _check_batch_norm(x, stats, weight, bias, training, eps)
    update = training and stats is not None
    if _dispatch.route(x) == "gpu":
        gpu = _gpu_kernel("prepare_batch_norm_forward")(
            x, None if stats is None else stats.mean, None if stats is None else stats.var, weight, bias, training,
            stats.num_batches_tracked if stats is not None and stats.count_batches else None)

        def call_gpu(input, stats, weight, bias, eps):
            eps = _checks.check_eps(eps)
            if stats is None:
                return gpu(input, None, None, weight, bias, None, None, eps)[0]
            if update:
                stats.check_update()  # momentum, writable statistics: before any work
            return gpu(input, stats.mean, stats.var, weight, bias,
                       stats.num_batches_tracked if stats.count_batches else None, stats.momentum, eps)[0]
        return call_gpu
    plain = _plain_input(input)

    def call_cpu(input, stats, weight, bias, eps):
        eps = _checks.check_eps(eps)
        if update:
            stats.check_update()  # momentum, writable statistics: before any work
        with _dispatch.quiet_floating_point():
            return _batch_norm_reference(plain(input), stats, weight, bias, training, eps)[0]
    return call_cpu


def _batch_norm_reference(x, stats: RunningStats | None, weight, bias, training: bool, eps: float):
    """Reference path of a checked batch norm: ``(y, save_mean, save_invstd)``.

    The saved statistics (accumulation dtype, ``(C,)``) are None in eval and for an empty batch;
    :mod:`cupybn.native` returns them, the functional API only ``y``.
    """
    xp = _dispatch.namespace(x)
    acc = _reference.accumulation_dtype(xp, x.dtype)
    x3 = _channel_stats_view(x)
    if _numel(x) == 0:  # empty batch: nothing to normalize; BatchNorm still counts the call
        if training and stats is not None:
            stats._update(None, None, 0)
        return xp.empty_like(x), None, None
    if training:
        m = _reference.moments(x3)
        invstd = _reference.inverse_std(m.var, eps, zero_for_zero_var=True)
        center, offset = (m.center if m.centred else None), m.offset
    else:
        center = _param(stats.mean, x, acc)
        offset = None
        invstd = 1.0 / xp.sqrt(_param(stats.var, x, acc) + eps)
    scale = invstd if weight is None else invstd * _param(weight, x, acc)
    shift = xp.zeros_like(scale) if bias is None else _param(bias, x, acc)
    if offset is not None:
        shift = shift - offset * scale
    # eval: torch's x * alpha + beta where the scale or centre is not finite (see normalize)
    y = xp.reshape(_reference.normalize(x3, center, scale, shift, torch_eval=not training), x.shape)
    if not training:
        return y, None, None
    if stats is not None:
        stats._update(m.mean, m.var, m.count)  # checked up front (check_update)
    return y, m.mean, invstd


@_quiet
def batch_norm_statistics(input, stats: RunningStats | None = None):
    """Per-channel ``(mean, biased var, count)`` of ``input`` ``(N, C, *)`` over every axis but 1.

    Used by :meth:`RunningStats.observe`; ``stats`` (optional) is checked against the channels.
    """
    x = _as_input(input)
    _check_batch_norm(x, stats, None, None, True, 0.0)
    if _dispatch.route(x) == "gpu":
        return _gpu_kernel("batch_norm_statistics")(x)
    if _numel(x) == 0:
        return None, None, 0
    m = _reference.moments(_channel_stats_view(x))
    return m.mean, m.var, m.count


# -------------------------------------------------------------------------------- instance norm

def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    r"""Instance normalization: each ``(sample, channel)`` slice normalized on its own statistics.

    As ``torch.nn.functional.instance_norm``: with ``use_input_stats`` the statistics are
    per-instance, and ``running_mean`` / ``running_var`` (when given) are updated in place with
    the mean over the batch of the per-instance statistics (unbiased variance); otherwise the
    running statistics normalize every instance. ``momentum=None`` means 0.

    Shape:
        - input: ``(N, C, *)`` with at least one spatial dimension; vectors ``(C,)``
        - output: same shape and dtype as input
    """
    momentum = 0.0 if momentum is None else momentum
    stats = _wrap_running_stats(running_mean, running_var, momentum)
    return _instance_norm(input, stats, weight, bias,
                          _checks.check_bool(use_input_stats, "use_input_stats"), eps)


def _instance_norm(input, stats: RunningStats | None, weight, bias, use_input_stats: bool, eps):
    if not use_input_stats:
        x = _as_input(input)
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
        if stats is None:
            raise ValueError("running_mean and running_var must be given when use_input_stats=False")
        return _batch_norm(x, stats, weight, bias, False, eps)
    d = _prepared.describe
    if stats is None:
        key = ("instance_norm", d(input), d(weight), d(bias))
    else:
        key = ("instance_norm", d(input), d(weight), d(bias), d(stats.mean), d(stats.var))
    return _prepared.cached(key, _prepare_instance_norm, input, stats, weight, bias, eps)(input, stats, weight, bias, eps)


def _prepare_instance_norm(input, stats, weight, bias, eps):
    """The checks an instance-norm signature (input statistics) fixes, once."""
    x = _as_input(input)
    if x.ndim < 2:
        raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")
    _check_channel_norm(x, stats, weight, bias, eps)
    _checks.check_more_than_one_value(math.prod(x.shape[2:]), x.shape, spatial=True)
    if _dispatch.route(x) == "gpu":
        gpu = _gpu_kernel("prepare_instance_norm_forward")(
            x, None if stats is None else stats.mean, None if stats is None else stats.var, weight, bias)

        def call_gpu(input, stats, weight, bias, eps):
            eps = _checks.check_eps(eps)
            if stats is None:
                return gpu(input, weight, bias, None, None, 0.0, eps)
            stats.check_update()  # momentum, writable statistics: before any work
            return gpu(input, weight, bias, stats.mean, stats.var, stats.momentum or 0.0, eps)
        return call_gpu
    plain = _plain_input(input)

    def call_cpu(input, stats, weight, bias, eps):
        eps = _checks.check_eps(eps)
        if stats is not None:
            stats.check_update()  # momentum, writable statistics: before any work
        with _dispatch.quiet_floating_point():
            return _instance_norm_reference(plain(input), stats, weight, bias, eps)[0]
    return call_cpu


def _instance_norm_reference(x, stats: RunningStats | None, weight, bias, eps: float):
    """Reference path of a checked instance norm with input statistics: ``(y, mean, invstd)``,
    saved statistics per (sample, channel), shape ``(N*C,)``; None for an empty batch."""
    xp = _dispatch.namespace(x)
    if _numel(x) == 0:
        return xp.empty_like(x), None, None
    n, c = x.shape[0], x.shape[1]
    acc = _reference.accumulation_dtype(xp, x.dtype)
    x3 = xp.reshape(x, (1, n * c, math.prod(x.shape[2:])))
    m = _reference.moments(x3)
    # instance norm is batch norm on the (1, N*C, L) view in ATen, so it shares the eps == 0 rule
    invstd = _reference.inverse_std(m.var, eps, zero_for_zero_var=True)
    scale = invstd if weight is None else invstd * _per_instance(_param(weight, x, acc), n)
    shift = -m.offset * scale
    if bias is not None:
        shift = shift + _per_instance(_param(bias, x, acc), n)
    y = _reference.normalize(x3, m.center, scale, shift)
    if stats is not None:  # checked up front (check_update)
        stats._update(xp.mean(xp.reshape(m.mean, (n, c)), axis=0),
                      xp.mean(xp.reshape(m.var, (n, c)), axis=0), m.count)
    return xp.reshape(y, x.shape), m.mean, invstd


def _per_instance(vec, n):
    """A ``(C,)`` vector repeated for each of ``n`` samples: shape ``(n*C,)``."""
    xp = _dispatch.namespace(vec)
    return xp.reshape(xp.broadcast_to(vec[None, :], (n, vec.shape[0])), (-1,))


# ----------------------------------------------------------------------------------- layer norm

def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple of non-negative ints: an int (Python or NumPy) or a
    sequence (tuple, list, ``torch.Size``) of them; strings, floats and bools are a TypeError."""
    t = type(normalized_shape)
    if t is int:
        return (_checks.check_int(normalized_shape, "normalized_shape", 0),)
    if t is tuple and all(type(s) is int and s >= 0 for s in normalized_shape):
        return normalized_shape  # the usual case (the layers pass their own tuple)
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        return (_checks.check_int(normalized_shape, "normalized_shape", 0),)
    if isinstance(normalized_shape, (str, bytes, bool)) or not hasattr(normalized_shape, "__iter__") \
            or getattr(normalized_shape, "ndim", 1) == 0:
        raise TypeError(f"normalized_shape must be an int or a tuple of ints, "
                        f"not {_checks._type_name(normalized_shape)}")
    shape = []
    for i, s in enumerate(normalized_shape):
        if type(s) is not int and (isinstance(s, bool) or not isinstance(s, numbers.Integral)):
            raise TypeError(f"normalized_shape must be an int or a tuple of ints, but found element "
                            f"of type {_checks._type_name(s)} at pos {i}")
        shape.append(_checks.check_int(s, "normalized_shape", 0))
    return tuple(shape)


def _check_layer_norm(x, normalized_shape, weight, bias) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple, checked against the input and the affine parameters."""
    shape = _normalized_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"Given normalized_shape={list(shape)}, expected input with shape "
                         f"[*, {', '.join(map(str, shape))}], but got input of size {tuple(x.shape)}")
    for a, name in ((weight, "weight"), (bias, "bias")):
        if a is not None:
            _checks.check_floating(a, name)
            if tuple(a.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (normalized_shape), got {tuple(a.shape)}")
            _checks.check_same_device(x, a, name)
    return shape


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    r"""Layer normalization over the last ``len(normalized_shape)`` dimensions.

    As ``torch.nn.functional.layer_norm``: each row of ``prod(normalized_shape)`` elements is
    normalized with its own mean and biased variance, then scaled elementwise by ``weight`` and
    shifted by ``bias`` (both of shape ``normalized_shape``, optional). Any ``eps`` is accepted.

    Shape:
        - input: ``(*, *normalized_shape)``; output: same shape and dtype
    """
    d = _prepared.describe
    t = type(normalized_shape)
    if t is int:
        shape = (normalized_shape,)
    elif t is tuple and all(type(s) is int for s in normalized_shape):
        shape = normalized_shape
    else:  # checked (and converted) by _check_layer_norm, in its turn; not cached
        shape = _prepared.UNCACHED
    key = ("layer_norm", shape, d(input), d(weight), d(bias))
    return _prepared.cached(key, _prepare_layer_norm, input, normalized_shape, weight, bias, eps)(
        input, weight, bias, eps)


def _prepare_layer_norm(input, normalized_shape, weight, bias, eps):
    """The checks a layer-norm signature fixes, once."""
    x = _as_input(input)
    shape = _check_layer_norm(x, normalized_shape, weight, bias)
    return _prepare_affine_groups(input, x, shape, weight, bias, eps, "prepare_layer_norm_forward",
                                  _layer_norm_reference)


def _prepare_affine_groups(input, x, arg, weight, bias, eps, gpu_name: str, reference):
    """The prepared call of layer or group norm once its structure is checked: ``arg`` (the
    checked ``normalized_shape`` / ``num_groups``) goes to ``_cuda.<gpu_name>`` or ``reference``;
    per call only ``eps`` is checked."""
    _checks.check_eps(eps, allow_negative=True)
    if _dispatch.route(x) == "gpu":
        gpu = _gpu_kernel(gpu_name)(x, arg, weight, bias)
        return lambda input, weight, bias, eps: gpu(input, weight, bias, None, None, 0.0,
                                                    _checks.check_eps(eps, allow_negative=True))
    plain = _plain_input(input)

    def call_cpu(input, weight, bias, eps):
        eps = _checks.check_eps(eps, allow_negative=True)
        with _dispatch.quiet_floating_point():
            return reference(plain(input), arg, weight, bias, eps)[0]
    return call_cpu


def _layer_norm_reference(x, shape: tuple[int, ...], weight, bias, eps: float):
    """Reference path of a checked layer norm: ``(y, mean, invstd)`` with one statistic per row,
    shape ``(rows,)``; None for an empty input."""
    xp = _dispatch.namespace(x)
    row = math.prod(shape)
    if _numel(x) == 0:
        return xp.empty_like(x), None, None
    acc = _reference.accumulation_dtype(xp, x.dtype)
    x3 = xp.reshape(x, (1, _numel(x) // row, row))
    m = _reference.moments(x3)
    invstd = _reference.inverse_std(m.var, eps, zero_for_zero_var=False)
    col_scale = None if weight is None else xp.reshape(_param(weight, x, acc), (row,))
    col_shift = None if bias is None else xp.reshape(_param(bias, x, acc), (row,))
    y = _reference.normalize(x3, m.center, invstd, -m.offset * invstd, col_scale, col_shift)
    return xp.reshape(y, x.shape), m.mean, invstd


# ----------------------------------------------------------------------------------- group norm

def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    r"""Group normalization: channels split into ``num_groups`` groups, each normalized per sample.

    As ``torch.nn.functional.group_norm``: statistics over each group's ``C / num_groups``
    channels and all spatial positions, then a per-channel affine ``weight`` / ``bias``.

    Shape:
        - input: ``(N, C, *)``; weight, bias: ``(C,)``; output: same shape and dtype as input
    """
    d = _prepared.describe
    key = ("group_norm", num_groups if type(num_groups) is int else _prepared.UNCACHED, d(input), d(weight), d(bias))
    return _prepared.cached(key, _prepare_group_norm, input, num_groups, weight, bias, eps)(input, weight, bias, eps)


def _prepare_group_norm(input, num_groups, weight, bias, eps):
    """The checks a group-norm signature fixes, once."""
    x = _as_input(input)
    g = _check_group_norm(x, num_groups, weight, bias, forward=True)
    return _prepare_affine_groups(input, x, g, weight, bias, eps, "prepare_group_norm_forward",
                                  _group_norm_reference)


def _check_group_norm(x, num_groups, weight, bias, forward: bool) -> int:
    """``num_groups`` as an int, checked against the input and the affine parameters.

    ``forward``: also torch's check that each group sees more than one value over the batch
    (``F.group_norm``'s ``_verify_batch_size`` on ``[N * C // G, G, *spatial]``, same message).
    """
    if x.ndim < 2:
        raise ValueError(f"Expected at least 2 dimensions for input tensor but received {x.ndim}")
    g = num_groups if type(num_groups) is int and num_groups > 0 else \
        _checks.check_int(num_groups, "num_groups", 1)
    n, c = x.shape[0], x.shape[1]
    if c % g != 0:
        raise ValueError(f"Expected number of channels in input to be divisible by num_groups, but "
                         f"got input of shape {tuple(x.shape)} and num_groups={g}")
    if forward and n * (c // g) * math.prod(x.shape[2:]) == 1:
        size = [n * c // g, g, *x.shape[2:]]
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    _checks.check_vector(weight, "weight", c, x)
    _checks.check_vector(bias, "bias", c, x)
    return g


def _group_norm_reference(x, g: int, weight, bias, eps: float):
    """Reference path of a checked group norm: ``(y, mean, invstd)`` with one statistic per
    (sample, group), shape ``(N*G,)``; None for an empty input."""
    xp = _dispatch.namespace(x)
    if _numel(x) == 0:
        return xp.empty_like(x), None, None
    n, c = x.shape[0], x.shape[1]
    acc = _reference.accumulation_dtype(xp, x.dtype)
    spatial = math.prod(x.shape[2:])
    m = _reference.moments(xp.reshape(x, (1, n * g, (c // g) * spatial)))
    invstd = _reference.inverse_std(m.var, eps, zero_for_zero_var=False)

    def per_channel(v):  # (N*G,) group values -> (N*C,) channel values
        return xp.reshape(xp.broadcast_to(xp.reshape(v, (n, g, 1)), (n, g, c // g)), (-1,))

    scale = per_channel(invstd)
    if weight is not None:
        scale = scale * _per_instance(_param(weight, x, acc), n)
    shift = -per_channel(m.offset) * scale
    if bias is not None:
        shift = shift + _per_instance(_param(bias, x, acc), n)
    y = _reference.normalize(xp.reshape(x, (1, n * c, spatial)), per_channel(m.center), scale, shift)
    return xp.reshape(y, x.shape), m.mean, invstd
