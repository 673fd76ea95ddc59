"""GPU calls planned once per signature: plan templates with slots, bound to buffers per call.

A prepared GPU call is made from the first call of a signature (shapes, strides, dtypes,
devices, flags; see :mod:`cupybn._prepared`). It plans the launches once with :class:`Slot`
placeholders where the planner would see buffers (the planner never looks at a buffer), lets the
launcher check the arguments and resolve the kernels once (``launcher.prepare``), and then each
call only converts what the signature says needs converting (nothing, for contiguous CuPy input
with parameters of one dtype), allocates its outputs, and hands the buffers to
``launcher.run``. Plans also depend on scalar arguments (``eps`` selects a kernel path,
``eps``/``momentum`` are kernel arguments): a prepared call keeps the plans of its last few
scalar values.
"""
from __future__ import annotations

import math

from . import interop, planner
from . import launchers
from .launchers import Slot

#: plans kept per prepared call, one per (eps, momentum) seen; a call with an unseen value replans
_SCALAR_PLANS = 8


def _operand(index: int, shape, dtype: str) -> planner.Operand:
    """A contiguous ``dtype`` operand of ``shape`` whose buffer is slot ``index``."""
    shape = tuple(int(s) for s in shape)
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    storage = "int64" if dtype == "int64" else planner.storage_dtype(dtype)  # int64: num_batches_tracked
    return planner.Operand(Slot(index, storage), shape, tuple(reversed(strides)), dtype)


class _Plans:
    """The launch plans of one prepared call, by scalar values; ``make(*scalars)`` plans."""

    __slots__ = ("make", "launcher", "plans")

    def __init__(self, make, launcher):
        self.make, self.launcher, self.plans = make, launcher, {}

    def get(self, scalars):
        prepared = self.plans.get(scalars)
        if prepared is None:
            from .. import _prepared

            prepared = self.launcher.prepare(self.make(*scalars))
            _prepared.cache.plans += 1
            if len(self.plans) >= _SCALAR_PLANS:
                self.plans.clear()
            self.plans[scalars] = prepared
        return prepared


def _converter(a, name: str, dtype: str | None, contiguous: bool):
    """What a call must do to ``a`` (an array of this signature) before binding it: None when
    nothing (a contiguous CuPy array of the kernel's dtype), else a function. (The kernels take
    pointers: the planner's operands carry the shapes, so a contiguous buffer of any shape binds.)"""
    arr, d = interop.as_cupy(a, name)
    if interop.is_cupy(a) and (d == dtype or dtype is None) and (not contiguous or arr.flags.c_contiguous):
        return None

    def convert(b):
        arr, d = interop.as_cupy(b, name)
        if dtype is not None and d != dtype:
            arr = interop.cast(arr, d, dtype)
        if contiguous:
            arr = interop.contiguous(arr)
        return arr
    return convert


def _bind(converters, arrays):
    return [a if c is None or a is None else c(a) for c, a in zip(converters, arrays)]


# ----------------------------------------------------------------------------------- batch norm forward

def batch_norm_forward(x, running_mean, running_var, weight, bias, training: bool, nbt):
    """Prepared GPU batch norm forward for arrays of this signature: ``call(x, running_mean,
    running_var, weight, bias, num_batches_tracked, momentum, eps) -> (y, save_mean, save_invstd)``
    (the saved statistics None in eval). See ``cupybn._cuda.batch_norm_forward``."""
    launcher = launchers.cupy_launcher()
    with interop.input_stream(x):
        xa, x_dtype = interop.as_cupy(x, "input")
        shape = tuple(int(s) for s in xa.shape)
        channels = shape[1]
        acc = planner.accumulation_dtype(x_dtype)
        affine = [interop.as_cupy(a, n)[1] for a, n in ((weight, "weight"), (bias, "bias"))]
        if training:
            p_dtype = interop.promote(affine)
            running = [interop.as_cupy(a, n) for a, n in ((running_mean, "running_mean"), (running_var, "running_var"))]
            for (arr, _), name in zip(running, ("running_mean", "running_var")):
                if arr is not None and arr.size > 1 and arr.strides[0] != arr.dtype.itemsize:
                    raise NotImplementedError(f"{name} must be contiguous on the GPU path (it is updated in place)")
            r_dtype = running[0][1]
            if r_dtype is not None and r_dtype != running[1][1]:
                raise NotImplementedError("running_mean and running_var of different dtypes on the GPU path "
                                          f"({r_dtype} / {running[1][1]})")
            if nbt is not None and interop.as_cupy(nbt, "num_batches_tracked")[1] != "int64":
                raise TypeError(f"num_batches_tracked must be int64, got {interop.as_cupy(nbt, 'n')[1]}")
            converters = [_converter(x, "input", None, True),
                          None if running_mean is None else _converter(running_mean, "running_mean", None, False),
                          None if running_var is None else _converter(running_var, "running_var", None, False),
                          None if weight is None else _converter(weight, "weight", p_dtype, True),
                          None if bias is None else _converter(bias, "bias", p_dtype, True),
                          None if nbt is None else _converter(nbt, "num_batches_tracked", None, False)]
        else:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var must be given when training=False")
            p_dtype = r_dtype = interop.promote(affine + [interop.as_cupy(a, n)[1] for a, n in (
                (running_mean, "running_mean"), (running_var, "running_var"))])
            converters = [_converter(x, "input", None, True)] + [
                None if a is None else _converter(a, n, p_dtype, True) for a, n in (
                    (running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias"))
            ] + [None]
    present = [running_mean is not None, running_var is not None, weight is not None, bias is not None,
               nbt is not None]
    vec = {1: r_dtype, 2: r_dtype, 3: p_dtype, 4: p_dtype}

    def vector(i, dtype):
        return _operand(i, (channels,), dtype) if present[i - 1] else None

    def make(eps, momentum):
        xo, yo = _operand(0, shape, x_dtype), _operand(6, shape, x_dtype)
        if not training:
            return planner.plan_batch_norm_eval_forward(xo, yo, vector(1, vec[1]), vector(2, vec[2]), vector(3, vec[3]),
                                                        vector(4, vec[4]), eps, device=launcher.device_info())
        nbt_op = _operand(5, (), "int64") if present[4] else None
        return planner.plan_batch_norm_train_forward(
            xo, yo, _operand(7, (channels,), acc), _operand(8, (channels,), acc), vector(1, vec[1]),
            vector(2, vec[2]), nbt_op, vector(3, vec[3]), vector(4, vec[4]), momentum, eps,
            device=launcher.device_info(), save_offset=_operand(9, (channels,), acc))

    plans = _Plans(make, launcher)
    empty_output = interop.output_allocator(x, x_dtype)

    scope = interop.stream_scope(x)
    import cupy

    def call(x, running_mean, running_var, weight, bias, nbt, momentum, eps):
        with scope(x):
            bufs = _bind(converters, (x, running_mean, running_var, weight, bias, nbt))
            native, y = empty_output(shape)
            bufs.append(y)
            if training:
                bufs += [cupy.empty((channels,), dtype=acc) for _ in range(3)]
            launcher.run(plans.get((eps, momentum)), bufs)
        return interop.to_native(x, native), (bufs[7] if training else None), (bufs[8] if training else None)
    return call


# ----------------------------------------------------------------------------------- layer / group / instance norm

def groups_forward(x, layout_of, weight, bias, zero_var_rule: bool, running_mean=None, running_var=None):
    """Prepared GPU forward of a contiguous-group norm (``planner.plan_groups_forward``):
    ``call(x, weight, bias, running_mean, running_var, momentum, eps) -> y``."""
    launcher = launchers.cupy_launcher()
    with interop.input_stream(x):
        xa, x_dtype = interop.as_cupy(x, "input")
        shape = tuple(int(s) for s in xa.shape)
        layout = layout_of(shape)
        p_dtype = interop.promote([interop.as_cupy(a, n)[1] for a, n in ((weight, "weight"), (bias, "bias"))])
        r_dtype = None
        if running_mean is not None:
            running = [interop.as_cupy(a, n) for a, n in ((running_mean, "running_mean"), (running_var, "running_var"))]
            for (arr, _), name in zip(running, ("running_mean", "running_var")):
                if arr.size > 1 and arr.strides[0] != arr.dtype.itemsize:
                    raise NotImplementedError(f"{name} must be contiguous on the GPU path (it is updated in place)")
            if running[0][1] != running[1][1]:
                raise NotImplementedError("running_mean and running_var of different dtypes on the GPU path")
            r_dtype = running[0][1]
        converters = [_converter(x, "input", None, True),
                      None if weight is None else _converter(weight, "weight", p_dtype, True),
                      None if bias is None else _converter(bias, "bias", p_dtype, True),
                      None if running_mean is None else _converter(running_mean, "running_mean", None, False),
                      None if running_var is None else _converter(running_var, "running_var", None, False)]
        per_sample = layout.length // layout.inner * layout.groups_per_sample if layout.inner else 0
    acc = planner.accumulation_dtype(x_dtype)
    groups = layout.groups

    def make(eps, momentum):
        def vec(i, present, n, dtype):
            return _operand(i, (n,), dtype) if present else None

        save = tuple(_operand(i, (groups,), acc) for i in (6, 7, 8))
        return planner.plan_groups_forward(
            _operand(0, shape, x_dtype), _operand(5, shape, x_dtype), layout,
            vec(1, weight is not None, per_sample, p_dtype), vec(2, bias is not None, per_sample, p_dtype), eps,
            zero_var_rule, vec(3, r_dtype is not None, shape[1] if len(shape) > 1 else 0, r_dtype),
            vec(4, r_dtype is not None, shape[1] if len(shape) > 1 else 0, r_dtype), momentum, save=save,
            device=launcher.device_info())

    plans = _Plans(make, launcher)
    empty_output = interop.output_allocator(x, x_dtype)
    stats_size = max(groups, 1)

    scope = interop.stream_scope(x)
    import cupy

    def call(x, weight, bias, running_mean, running_var, momentum, eps):
        with scope(x):
            bufs = _bind(converters, (x, weight, bias, running_mean, running_var))
            native, y = empty_output(shape)
            bufs.append(y)
            prepared = plans.get((eps, momentum))
            if any(launch.uses(6) for launch in prepared):  # the split path keeps statistics in memory
                bufs += [cupy.empty((stats_size,), dtype=acc) for _ in range(3)]
            launcher.run(prepared, bufs)
        return interop.to_native(x, native)
    return call


# ----------------------------------------------------------------------------------- backward

def _input_for_grad(x, grad_output):
    """``(x as CuPy, x's dtype name)``; NotImplementedError where ``grad_output``'s dtype cannot be
    converted to a bfloat16 ``x``'s (as ``cupybn._cuda._input_and_grad`` refuses it per call)."""
    xa, x_dtype = interop.as_cupy(x, "input")
    if x_dtype == "bfloat16" and interop.as_cupy(grad_output, "grad_output")[1] != x_dtype:
        raise NotImplementedError("grad_output of another dtype than a bfloat16 input on the GPU path")
    return xa, x_dtype


def groups_backward(grad_output, x, layout_of, mean, rstd, weight, gw_dtype: str, gb_dtype: str, mask,
                    per_sample: int):
    """Prepared GPU backward of layer / group / instance norm (``planner.plan_groups_backward``)
    for non-empty arrays of this signature: ``call(grad_output, x, mean, rstd, weight) -> (dx, gw,
    gb)`` as CuPy-side buffers (``dx`` native); entries not in ``mask`` None."""
    launcher = launchers.cupy_launcher()
    with interop.input_stream(x):
        xa, x_dtype = _input_for_grad(x, grad_output)
        shape = tuple(int(s) for s in xa.shape)
        layout = layout_of(shape)
        acc = planner.accumulation_dtype(x_dtype)
        for name, a in (("mean", mean), ("rstd", rstd)):
            if a is None:
                raise ValueError(f"{name} is required")
            arr = interop.as_cupy(a, name)[0]
            if arr.size != layout.groups:
                raise ValueError(f"{name} must have {layout.groups} values, got shape {tuple(arr.shape)}")
        w_dtype = interop.as_cupy(weight, "weight")[1]
        converters = [_converter(grad_output, "grad_output", x_dtype, True), _converter(x, "input", None, True),
                      _converter(mean, "mean", acc, True), _converter(rstd, "rstd", acc, True),
                      None if weight is None else _converter(weight, "weight", None, True)]
    device = launcher.device_info()
    groups = layout.groups
    ws_size = planner.groups_backward_workspace(layout, device) if (mask[1] or mask[2]) else 0

    def make():
        g_op, x_op = _operand(0, shape, x_dtype), _operand(1, shape, x_dtype)
        st = (_operand(2, (groups,), acc), _operand(3, (groups,), acc))
        w_op = None if weight is None else _operand(4, (per_sample,), w_dtype)
        dx_op = _operand(5, shape, x_dtype) if mask[0] else None
        gw_op = _operand(6, (per_sample,), gw_dtype) if mask[1] else None
        gb_op = _operand(7, (per_sample,), gb_dtype) if mask[2] else None
        sums = _operand(8, (2 * groups,), acc) if mask[0] else None
        ws = _operand(9, (ws_size,), acc) if ws_size else None
        if gw_op is not None and gb_op is not None and gw_dtype != gb_dtype:
            return (planner.plan_groups_backward(g_op, x_op, dx_op, layout, *st, w_op, gw_op, None, sums, ws,
                                                 device=device)
                    + planner.plan_groups_backward(g_op, x_op, None, layout, *st, w_op, None, gb_op, None, ws,
                                                   device=device))
        return planner.plan_groups_backward(g_op, x_op, dx_op, layout, *st, w_op, gw_op, gb_op, sums, ws,
                                            device=device)

    plans = _Plans(lambda: make(), launcher)
    empty_output = interop.output_allocator(x, x_dtype)
    gw_storage, gb_storage = planner.storage_dtype(gw_dtype), planner.storage_dtype(gb_dtype)

    scope = interop.stream_scope(x)
    import cupy

    def call(grad_output, x, mean, rstd, weight):
        with scope(x):
            bufs = _bind(converters, (grad_output, x, mean, rstd, weight))
            native_dx, dx = empty_output(shape) if mask[0] else (None, None)
            gw = cupy.empty((per_sample,), dtype=gw_storage) if mask[1] else None
            gb = cupy.empty((per_sample,), dtype=gb_storage) if mask[2] else None
            bufs += [dx, gw, gb, cupy.empty((2 * groups,), dtype=acc) if mask[0] else None,
                     cupy.empty((ws_size,), dtype=acc) if ws_size else None]
            launcher.run(plans.get(()), bufs)
        return (None if native_dx is None else interop.to_native(x, native_dx)), gw, gb
    return call


def batch_norm_backward(grad_output, x, weight, mean, stat, train: bool, mask):
    """Prepared GPU batch norm backward (``planner.plan_batch_norm_backward``) for non-empty arrays
    of this signature; ``mean`` / ``stat`` are the saved statistics (``train``) or the running
    ones. ``call(grad_output, x, weight, mean, stat, eps) -> (dx, gw, gb)`` (``dx`` native)."""
    launcher = launchers.cupy_launcher()
    with interop.input_stream(x):
        xa, x_dtype = _input_for_grad(x, grad_output)
        shape = tuple(int(s) for s in xa.shape)
        channels = shape[1]
        acc = planner.accumulation_dtype(x_dtype)
        names = ("save_mean", "save_invstd") if train else ("running_mean", "running_var")
        dtypes = []
        for name, a in zip(names, (mean, stat)):
            if a is None:
                raise ValueError(f"{name} is required")
            arr, d = interop.as_cupy(a, name)
            if arr.size != channels:
                raise ValueError(f"{name} must have {channels} values, got shape {tuple(arr.shape)}")
            dtypes.append(d)
        w_dtype = interop.as_cupy(weight, "weight")[1]
        p = w_dtype if weight is not None else x_dtype
        s_dtype = dtypes[0] if dtypes[0] == dtypes[1] else None
        if s_dtype is None or (s_dtype, p) not in planner.backward_stats_params(x_dtype):
            s_dtype = acc
        converters = [_converter(grad_output, "grad_output", x_dtype, True), _converter(x, "input", None, True),
                      _converter(mean, names[0], s_dtype, True), _converter(stat, names[1], s_dtype, True),
                      None if weight is None else _converter(weight, "weight", None, True)]
    device = launcher.device_info()

    def make(eps):
        return planner.plan_batch_norm_backward(
            _operand(0, shape, x_dtype), _operand(1, shape, x_dtype), _operand(5, shape, x_dtype) if mask[0] else None,
            _operand(2, (channels,), s_dtype), _operand(3, (channels,), s_dtype), train,
            None if weight is None else _operand(4, (channels,), w_dtype),
            _operand(6, (channels,), p) if mask[1] else None, _operand(7, (channels,), p) if mask[2] else None,
            _operand(8, (3 * channels,), acc) if train and mask[0] else None, eps, device=device)

    plans = _Plans(make, launcher)
    empty_output = interop.output_allocator(x, x_dtype)
    storage = planner.storage_dtype(p)
    scope = interop.stream_scope(x)
    import cupy

    def call(grad_output, x, weight, mean, stat, eps):
        with scope(x):
            bufs = _bind(converters, (grad_output, x, mean, stat, weight))
            native_dx, dx = empty_output(shape) if mask[0] else (None, None)
            gw = cupy.empty((channels,), dtype=storage) if mask[1] else None
            gb = cupy.empty((channels,), dtype=storage) if mask[2] else None
            bufs += [dx, gw, gb, cupy.empty((3 * channels,), dtype=acc) if train and mask[0] else None]
            launcher.run(plans.get((eps,)), bufs)
        return (None if native_dx is None else interop.to_native(x, native_dx)), gw, gb, p
    return call
