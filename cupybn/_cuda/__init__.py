"""cupybn's GPU path: hand-written CUDA kernels (``kernels/*.cu``) compiled at run time by NVRTC.

Modules:

* ``planner``   -- turns (op, shapes, strides, dtypes) into kernel launches; holds the one list of
  kernel instantiations (``planner.INSTANTIATIONS``) and the launch heuristics;
* ``launchers`` -- the CuPy ``RawModule`` launcher (the emulator launcher lives in the tests);
* ``interop``   -- DLPack / stream handling for CuPy arrays, CUDA torch tensors, other producers;
* ``source``    -- where the ``.cu`` files are, and the NVRTC options.

Importing this package imports neither CuPy nor torch.
"""
from __future__ import annotations

import math

from .interop import is_gpu_array

__all__ = ["batch_norm_backward", "batch_norm_forward", "batch_norm_training_forward", "native_batch_norm", "group_norm_forward", "instance_norm_forward",
           "is_gpu_array", "layer_norm_forward", "native_layer_norm", "layer_norm_backward", "native_group_norm",
           "group_norm_backward", "native_instance_norm", "instance_norm_backward"]


def _input_and_grad(input, grad_output):
    """``(x, x dtype, grad_output)`` as contiguous CuPy arrays, grad_output in x's dtype.

    Call inside ``interop.input_stream(input)``.
    """
    from . import interop

    x, x_dtype = interop.as_cupy(input, "input")
    x = interop.contiguous(x)
    g, g_dtype = interop.as_cupy(grad_output, "grad_output")
    g = interop.contiguous(g)
    if g_dtype != x_dtype:
        if x_dtype == "bfloat16":
            raise NotImplementedError("grad_output of another dtype than a bfloat16 input on the GPU path")
        g = interop.contiguous(interop.cast(g, g_dtype, x_dtype))
    return x, x_dtype, g


def _require_cupy():
    """The GPU path computes with CuPy; without it, say so (a torch-only install lands here)."""
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError("the GPU path needs CuPy (pip install cupy-cuda12x); "
                                  "CPU inputs (NumPy, torch CPU) work without it") from exc


def prepare_batch_norm_forward(input, running_mean, running_var, weight, bias, training, num_batches_tracked):
    """A prepared GPU batch norm forward for arrays of this signature (see :mod:`.prepared`):
    ``call(input, running_mean, running_var, weight, bias, num_batches_tracked, momentum, eps)
    -> (output, save_mean, save_invstd)``."""
    _require_cupy()
    from . import prepared

    return prepared.batch_norm_forward(input, running_mean, running_var, weight, bias, training, num_batches_tracked)


def prepare_layer_norm_forward(input, normalized_shape, weight, bias):
    """A prepared GPU layer norm (see :func:`layer_norm_forward`): ``call(input, weight, bias, None,
    None, 0.0, eps) -> output``."""
    _require_cupy()
    from . import planner, prepared

    shape = tuple(int(s) for s in normalized_shape)
    return prepared.groups_forward(input, lambda s: planner.layer_norm_layout(s, shape), weight, bias, False)


def prepare_group_norm_forward(input, num_groups, weight, bias):
    """A prepared GPU group norm (see :func:`group_norm_forward`), called as
    :func:`prepare_layer_norm_forward`'s."""
    _require_cupy()
    from . import planner, prepared

    grp = int(num_groups)
    return prepared.groups_forward(input, lambda s: planner.group_norm_layout(s, grp), weight, bias, False)


def prepare_instance_norm_forward(input, running_mean, running_var, weight, bias):
    """A prepared GPU instance norm with input statistics (see :func:`instance_norm_forward`):
    ``call(input, weight, bias, running_mean, running_var, momentum, eps) -> output``."""
    _require_cupy()
    from . import planner, prepared

    return prepared.groups_forward(input, planner.instance_norm_layout, weight, bias, True, running_mean, running_var)


def batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked=None):
    """GPU path of ``cupybn.batch_norm``.

    ``input`` is a ``cupy.ndarray``, a CUDA ``torch.Tensor`` or another CUDA ``__dlpack__``
    producer; the other arrays are on the same device, any framework, or ``None``. Arguments are
    already validated (shapes, dtypes, rank >= 2, eps >= 0, more than one value per channel in
    training, momentum). Returns the output in the input's framework and dtype, computed on the
    current stream (torch's current stream for torch input, CuPy's otherwise) without a host sync.

    Eval (``training=False`` with running statistics) is one kernel launch:
    ``y = (x - running_mean) * (1 / sqrt(running_var + eps) * weight) + bias``.
    Training is two launches (:func:`batch_norm_training_forward`): per-channel statistics with the
    running-statistics update fused in (``num_batches_tracked``, a 0-d int64 device array, is
    incremented on the device; ``momentum=None`` uses ``1 / num_batches_tracked`` after the
    increment), then the normalize. Non-contiguous input is made contiguous first; parameters of
    mixed dtypes are widened to one dtype.
    """
    _require_cupy()
    if training:
        return batch_norm_training_forward(input, running_mean, running_var, weight, bias, momentum, eps,
                                           num_batches_tracked)[0]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    from . import interop, planner
    from .launchers import cupy_launcher

    launcher = cupy_launcher()
    with interop.input_stream(input):
        x, x_dtype = interop.as_cupy(input, "input")  # zero-copy view, any strides
        x = interop.contiguous(x)  # a copy (on this stream) only when x is not C-contiguous
        params = {name: interop.as_cupy(a, name) for name, a in (
            ("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))}
        # One parameter dtype for the kernel: mixed dtypes are widened (exactly) to the widest.
        param_dtype = interop.promote(d for _, d in params.values())
        ops = {name: None if arr is None else
               planner.Operand.of(interop.contiguous(interop.cast(arr, d, param_dtype)), param_dtype)
               for name, (arr, d) in params.items()}
        native, y = interop.empty_output(input, x, x_dtype)
        plan = planner.plan_batch_norm_eval_forward(
            planner.Operand.of(x, x_dtype), planner.Operand.of(y, x_dtype),
            ops["running_mean"], ops["running_var"], ops["weight"], ops["bias"], eps,
            device=launcher.device_info())
        launcher.launch(plan)
    return interop.to_native(input, native)


def batch_norm_training_forward(input, running_mean, running_var, weight, bias, momentum, eps,
                                num_batches_tracked=None):
    """BatchNorm training forward on the GPU: ``(output, save_mean, save_invstd)``.

    ``save_mean`` / ``save_invstd`` are CuPy ``(C,)`` arrays in the accumulation dtype (float32;
    float64 for float64 input), as ATen's ``native_batch_norm`` returns them (for the backward).
    ``running_mean`` / ``running_var`` (optional, any one float dtype, contiguous) are updated in
    place on the device, ``num_batches_tracked`` (optional 0-d int64) incremented there. Two kernel
    launches, no host sync; an empty batch launches only the counter update (or nothing).
    """
    from . import interop, planner
    from .launchers import cupy_launcher

    launcher = cupy_launcher()
    with interop.input_stream(input):
        import cupy

        x, x_dtype = interop.as_cupy(input, "input")
        x = interop.contiguous(x)
        affine = {name: interop.as_cupy(a, name) for name, a in (("weight", weight), ("bias", bias))}
        param_dtype = interop.promote(d for _, d in affine.values())
        ops = {name: None if arr is None else
               planner.Operand.of(interop.contiguous(interop.cast(arr, d, param_dtype)), param_dtype)
               for name, (arr, d) in affine.items()}
        running = {}
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            arr, d = interop.as_cupy(a, name)
            if arr is not None and arr.size > 1 and arr.strides[0] != arr.dtype.itemsize:
                raise NotImplementedError(f"{name} must be contiguous on the GPU path (it is updated in place)")
            running[name] = None if arr is None else planner.Operand.of(arr, d)
        if running["running_mean"] is not None and running["running_mean"].dtype != running["running_var"].dtype:
            raise NotImplementedError("running_mean and running_var of different dtypes on the GPU path "
                                      f"({running['running_mean'].dtype} / {running['running_var'].dtype})")
        nbt = None
        if num_batches_tracked is not None:
            arr, d = interop.as_cupy(num_batches_tracked, "num_batches_tracked")
            if d != "int64":
                raise TypeError(f"num_batches_tracked must be int64, got {d}")
            nbt = planner.Operand.of(arr)
        acc = planner.accumulation_dtype(x_dtype)
        channels = int(x.shape[1])
        save_mean = cupy.empty((channels,), dtype=acc)
        save_invstd = cupy.empty((channels,), dtype=acc)
        save_offset = cupy.empty((channels,), dtype=acc)
        native, y = interop.empty_output(input, x, x_dtype)
        plan = planner.plan_batch_norm_train_forward(
            planner.Operand.of(x, x_dtype), planner.Operand.of(y, x_dtype),
            planner.Operand.of(save_mean), planner.Operand.of(save_invstd),
            running["running_mean"], running["running_var"], nbt, ops["weight"], ops["bias"],
            momentum, eps, device=launcher.device_info(), save_offset=planner.Operand.of(save_offset))
        launcher.launch(plan)
    return interop.to_native(input, native), save_mean, save_invstd


def _native_vector(input, arr):
    """A per-channel CuPy result in the input's framework (torch: zero-copy through DLPack)."""
    if interop_framework(input) == "torch":
        import torch

        return torch.from_dlpack(arr)
    return arr


def _channel_vector(a, name, channels):
    """``(cupy array of shape (channels,), dtype name)`` of a per-channel (or per-group) statistic;
    ValueError unless it holds ``channels`` values."""
    from . import interop

    arr, d = interop.as_cupy(a, name)
    if arr.size != channels:
        raise ValueError(f"{name} must have {channels} values, got shape {tuple(arr.shape)}")
    return interop.contiguous(arr.reshape(channels)), d


def _native_params(input, p, arrays):
    """Per-channel parameter gradients (CuPy storage of dtype ``p``, or None) in the input's
    framework; bfloat16 for torch as a view of the 16-bit storage (CuPy has no bfloat16)."""
    if p == "bfloat16" and interop_framework(input) == "torch":
        import torch

        return tuple(None if a is None else torch.from_dlpack(a).view(torch.bfloat16) for a in arrays)
    return tuple(None if a is None else _native_vector(input, a) for a in arrays)


def interop_framework(input):
    from . import interop

    return interop.framework(input)


def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """GPU path of ``cupybn.native.native_batch_norm``: ``(output, save_mean, save_invstd)``.

    Training: :func:`batch_norm_training_forward` (2 launches; running statistics updated in place).
    Eval: :func:`batch_norm_forward` (1 launch) and empty ``(0,)`` statistics, as ATen. The saved
    statistics are ``(C,)`` in the accumulation dtype, in the input's framework.
    """
    _require_cupy()
    from . import interop, planner

    if training:
        y, save_mean, save_invstd = batch_norm_training_forward(input, running_mean, running_var, weight, bias,
                                                                momentum, eps)
        return y, _native_vector(input, save_mean), _native_vector(input, save_invstd)
    y = batch_norm_forward(input, running_mean, running_var, weight, bias, False, momentum, eps)
    import cupy

    _, x_dtype = interop.as_cupy(input, "input")
    acc = planner.accumulation_dtype(x_dtype)
    return y, _native_vector(input, cupy.empty((0,), dtype=acc)), _native_vector(input, cupy.empty((0,), dtype=acc))


def batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean, save_invstd, train,
                        eps, output_mask):
    """GPU path of ``cupybn.native.batch_norm_backward``: ``(grad_input, grad_weight, grad_bias)``.

    Arguments validated by the caller (shapes of x / grad_output / weight, eps). ``train``: the
    statistics are ``save_mean`` / ``save_invstd``; else ``running_mean`` / ``running_var``. At most
    two launches (``planner.plan_batch_norm_backward``): a per-channel reduction of ``sum(dy)`` and
    ``sum(dy * xhat)`` (deterministic, no float atomics) that also writes ``grad_weight`` /
    ``grad_bias``, then the elementwise ``grad_input``. No host sync. Entries not asked for by
    ``output_mask`` are None; parameter gradients have the weight's dtype (else the input's).
    """
    _require_cupy()
    from .. import _prepared
    from . import interop, planner, prepared
    from .launchers import cupy_launcher

    mask = tuple(bool(m) for m in output_mask)
    if math.prod(input.shape):  # prepared once per signature
        d = _prepared.describe
        mean, stat = (save_mean, save_invstd) if train else (running_mean, running_var)
        key = ("gpu_batch_norm_backward", bool(train), mask, d(grad_output), d(input), d(weight), d(mean), d(stat))
        call = _prepared.cached(key, prepared.batch_norm_backward, grad_output, input, weight, mean, stat,
                                bool(train), mask)
        dx, gw, gb, p = call(grad_output, input, weight, mean, stat, eps)
        return (dx, *_native_params(input, p, (gw, gb)))
    launcher = cupy_launcher()
    with interop.input_stream(input):
        import cupy

        x, x_dtype, g = _input_and_grad(input, grad_output)
        acc = planner.accumulation_dtype(x_dtype)
        channels = int(x.shape[1])
        if train:
            stats = (("save_mean", save_mean), ("save_invstd", save_invstd))
        else:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var are required when train=False")
            stats = (("running_mean", running_mean), ("running_var", running_var))
        st = []
        for name, a in stats:
            if a is None:
                raise ValueError(f"{name} is required")
            st.append(_channel_vector(a, name, channels))
        w, w_dtype = interop.as_cupy(weight, "weight")
        p = w_dtype if w is not None else x_dtype
        s_dtype = st[0][1] if st[0][1] == st[1][1] else None
        if s_dtype is None or (s_dtype, p) not in planner.backward_stats_params(x_dtype):
            st = [(interop.contiguous(interop.cast(arr, d, acc)), acc) for arr, d in st]
            s_dtype = acc
        mean_op, stat_op = (planner.Operand.of(arr, d) for arr, d in st)
        w_op = None if w is None else planner.Operand.of(interop.contiguous(w), w_dtype)
        storage = planner.storage_dtype(p)
        native_dx, dx = interop.empty_output(input, x, x_dtype) if mask[0] else (None, None)
        gw = cupy.empty((channels,), dtype=storage) if mask[1] else None
        gb = cupy.empty((channels,), dtype=storage) if mask[2] else None
        sums = cupy.empty((3 * channels,), dtype=acc) if (train and mask[0]) else None
        if x.size == 0:
            for a in (gw, gb):
                if a is not None:
                    a.fill(0)
        else:
            plan = planner.plan_batch_norm_backward(
                planner.Operand.of(g, x_dtype), planner.Operand.of(x, x_dtype),
                None if dx is None else planner.Operand.of(dx, x_dtype), mean_op, stat_op, bool(train), w_op,
                None if gw is None else planner.Operand.of(gw, p), None if gb is None else planner.Operand.of(gb, p),
                None if sums is None else planner.Operand.of(sums), eps, device=launcher.device_info())
            launcher.launch(plan)
    out_dx = None if native_dx is None else interop.to_native(input, native_dx)
    return (out_dx, *_native_params(input, p, (gw, gb)))


# ------------------------------------------------------------------------------------ layer / group / instance norm

def _groups_forward(input, layout_of, weight, bias, eps, zero_var_rule, running_mean=None, running_var=None,
                    momentum=0.1):
    """The shared GPU path of layer, group and instance norm: contiguous groups of ``x``, one
    statistic per group, per-element affine (``planner.plan_groups_forward``). One launch for groups
    that fit on chip, two for few very large groups. No host sync."""
    _require_cupy()
    from . import interop, planner
    from .launchers import cupy_launcher

    launcher = cupy_launcher()
    with interop.input_stream(input):
        import cupy

        x, x_dtype = interop.as_cupy(input, "input")
        x = interop.contiguous(x)
        layout = layout_of(tuple(int(s) for s in x.shape))
        affine = {name: interop.as_cupy(a, name) for name, a in (("weight", weight), ("bias", bias))}
        param_dtype = interop.promote(d for _, d in affine.values())
        ops = {name: None if arr is None else
               planner.Operand.of(interop.contiguous(interop.cast(arr, d, param_dtype)).reshape(-1), param_dtype)
               for name, (arr, d) in affine.items()}
        running = {}
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            arr, d = interop.as_cupy(a, name)
            if arr is not None and arr.size > 1 and arr.strides[0] != arr.dtype.itemsize:
                raise NotImplementedError(f"{name} must be contiguous on the GPU path (it is updated in place)")
            running[name] = None if arr is None else planner.Operand.of(arr, d)
        if running["running_mean"] is not None and running["running_mean"].dtype != running["running_var"].dtype:
            raise NotImplementedError("running_mean and running_var of different dtypes on the GPU path")
        acc = planner.accumulation_dtype(x_dtype)
        save = tuple(planner.Operand.of(cupy.empty((max(layout.groups, 1),), dtype=acc)) for _ in range(3))
        save = tuple(planner.Operand(s.buf, (layout.groups,), (1,), s.dtype) for s in save)
        native, y = interop.empty_output(input, x, x_dtype)
        plan = planner.plan_groups_forward(
            planner.Operand.of(x, x_dtype), planner.Operand.of(y, x_dtype), layout, ops["weight"], ops["bias"],
            eps, zero_var_rule, running["running_mean"], running["running_var"], momentum, save=save,
            device=launcher.device_info())
        launcher.launch(plan)
    return interop.to_native(input, native)


def layer_norm_forward(input, normalized_shape, weight, bias, eps):
    """GPU path of ``cupybn.layer_norm`` (arguments validated): rows of ``prod(normalized_shape)``
    elements, elementwise ``weight`` / ``bias`` of shape ``normalized_shape`` (optional).
    One launch for rows of up to 8192 values (4096 f64); see ``planner.plan_groups_forward``."""
    from . import planner

    shape = tuple(int(s) for s in normalized_shape)
    return _groups_forward(input, lambda s: planner.layer_norm_layout(s, shape), weight, bias, eps, False)


def group_norm_forward(input, num_groups, weight, bias, eps):
    """GPU path of ``cupybn.group_norm`` (arguments validated): groups of ``C / G * spatial``
    values per sample, per-channel ``weight`` / ``bias``."""
    from . import planner

    return _groups_forward(input, lambda s: planner.group_norm_layout(s, int(num_groups)), weight, bias, eps,
                           False)


def instance_norm_forward(input, running_mean, running_var, weight, bias, momentum, eps):
    """GPU path of ``cupybn.instance_norm`` with ``use_input_stats=True`` (arguments validated):
    per-(sample, channel) statistics; ``running_mean`` / ``running_var`` (optional) updated in
    place on the device with the mean over the batch of the per-instance statistics (unbiased
    variance), ``momentum`` as given (None already mapped to 0). Batch norm's eps == 0 rule."""
    from . import planner

    return _groups_forward(input, planner.instance_norm_layout, weight, bias, eps, True, running_mean,
                           running_var, 0.0 if momentum is None else momentum)


# ------------------------------------------------------------------------------------ native forward / backward
# (layer and group norm: statistics out of the forward, and the backward; kernels/groups_backward.cu)

def _groups_native_forward(input, layout_of, weight, bias, eps, stat_shape_of):
    """``(output, mean, rstd)`` of a contiguous-group norm: the statistics launch (``moments_forward``
    over the ``(1, groups, L)`` view, into ``mean`` / ``rstd`` / the exact mean offset) and the
    group normalize -- ``plan_groups_forward``'s "split" path, the one that leaves the statistics
    in memory. 2 launches, no host sync. ``mean`` / ``rstd`` in the accumulation dtype, shaped by
    ``stat_shape_of(x.shape)``."""
    _require_cupy()
    from . import interop, planner
    from .launchers import cupy_launcher

    if eps == 0:
        raise NotImplementedError("eps == 0 is not supported by the GPU path of native_layer_norm / "
                                  "native_group_norm (the statistics kernel maps var == eps == 0 to rstd 0)")
    launcher = cupy_launcher()
    with interop.input_stream(input):
        import cupy

        x, x_dtype = interop.as_cupy(input, "input")
        x = interop.contiguous(x)
        shape = tuple(int(s) for s in x.shape)
        layout = layout_of(shape)
        stat_shape = stat_shape_of(shape)
        affine = {name: interop.as_cupy(a, name) for name, a in (("weight", weight), ("bias", bias))}
        param_dtype = interop.promote(d for _, d in affine.values())
        ops = {name: None if arr is None else
               planner.Operand.of(interop.contiguous(interop.cast(arr, d, param_dtype)).reshape(-1), param_dtype)
               for name, (arr, d) in affine.items()}
        acc = planner.accumulation_dtype(x_dtype)
        bufs = [cupy.empty((max(layout.groups, 1),), dtype=acc) for _ in range(3)]
        save = tuple(planner.Operand(planner.Operand.of(b).buf, (layout.groups,), (1,), acc) for b in bufs)
        native, y = interop.empty_output(input, x, x_dtype)
        if x.size:
            plan = planner.plan_groups_forward(
                planner.Operand.of(x, x_dtype), planner.Operand.of(y, x_dtype), layout, ops["weight"],
                ops["bias"], eps, False, save=save, path="split", device=launcher.device_info())
            launcher.launch(plan)
        mean = bufs[0][:layout.groups].reshape(stat_shape)
        rstd = bufs[1][:layout.groups].reshape(stat_shape)
    return interop.to_native(input, native), _native_vector(input, mean), _native_vector(input, rstd)


def native_layer_norm(input, normalized_shape, weight, bias, eps):
    """GPU path of ``cupybn.native.native_layer_norm``: ``(output, mean, rstd)``, the statistics
    shaped ``input.shape[:-k] + (1,) * k``. See :func:`_groups_native_forward`."""
    from . import planner

    shape = tuple(int(s) for s in normalized_shape)
    k = len(shape)
    return _groups_native_forward(input, lambda s: planner.layer_norm_layout(s, shape), weight, bias, eps,
                                  lambda s: tuple(s[:len(s) - k]) + (1,) * k)


def native_group_norm(input, num_groups, weight, bias, eps):
    """GPU path of ``cupybn.native.native_group_norm``: ``(output, mean, rstd)``, the statistics
    ``(N, num_groups)``. See :func:`_groups_native_forward`."""
    from . import planner

    grp = int(num_groups)
    return _groups_native_forward(input, lambda s: planner.group_norm_layout(s, grp), weight, bias, eps,
                                  lambda s: (s[0], grp))


def _groups_backward(grad_output, input, layout_of, mean, rstd, weight, gw_dtype_of, gb_dtype_of, output_mask,
                     per_sample_of):
    """The shared GPU backward of layer and group norm (``planner.plan_groups_backward``):
    ``(grad_input, grad_weight, grad_bias)``, entries not asked for None. ``gw_dtype_of`` /
    ``gb_dtype_of`` map x's dtype to the parameter gradients' dtypes."""
    _require_cupy()
    from .. import _prepared
    from . import interop, planner, prepared
    from .launchers import cupy_launcher

    mask = tuple(bool(m) for m in output_mask)
    x_dtype = interop.as_cupy(input, "input")[1]
    if math.prod(input.shape):  # prepared once per signature (the layout is a function of the shape)
        d = _prepared.describe
        shape = tuple(int(s) for s in input.shape)
        gw_dtype, gb_dtype = gw_dtype_of(x_dtype), gb_dtype_of(x_dtype)
        key = ("gpu_groups_backward", layout_of(shape), gw_dtype, gb_dtype, mask, d(grad_output), d(input), d(mean),
               d(rstd), d(weight))
        call = _prepared.cached(key, prepared.groups_backward, grad_output, input, layout_of, mean, rstd, weight,
                                gw_dtype, gb_dtype, mask, int(per_sample_of(shape)))
        dx, gw, gb = call(grad_output, input, mean, rstd, weight)
        return dx, *_native_params(input, gw_dtype, (gw,)), *_native_params(input, gb_dtype, (gb,))
    launcher = cupy_launcher()
    with interop.input_stream(input):
        import cupy

        x, x_dtype, g = _input_and_grad(input, grad_output)
        layout = layout_of(tuple(int(s) for s in x.shape))
        acc = planner.accumulation_dtype(x_dtype)
        per_sample = int(per_sample_of(tuple(int(s) for s in x.shape)))
        gw_dtype, gb_dtype = gw_dtype_of(x_dtype), gb_dtype_of(x_dtype)
        gw = cupy.empty((per_sample,), dtype=planner.storage_dtype(gw_dtype)) if mask[1] else None
        gb = cupy.empty((per_sample,), dtype=planner.storage_dtype(gb_dtype)) if mask[2] else None
        native_dx, dx = interop.empty_output(input, x, x_dtype) if mask[0] else (None, None)
        if x.size == 0:
            for a in (gw, gb):
                if a is not None:
                    a.fill(0)
        else:
            st = []
            for name, a in (("mean", mean), ("rstd", rstd)):
                if a is None:
                    raise ValueError(f"{name} is required")
                arr, d = _channel_vector(a, name, layout.groups)
                st.append(planner.Operand.of(interop.contiguous(interop.cast(arr, d, acc)) if d != acc else arr, acc))
            w, w_dtype = interop.as_cupy(weight, "weight")
            w_op = None if w is None else planner.Operand.of(interop.contiguous(w).reshape(-1), w_dtype)
            sums = planner.Operand.of(cupy.empty((2 * layout.groups,), dtype=acc)) if mask[0] else None
            device = launcher.device_info()
            ws = None
            if mask[1] or mask[2]:
                ws = planner.Operand.of(cupy.empty((planner.groups_backward_workspace(layout, device),), dtype=acc))
            gw_op = None if gw is None else planner.Operand.of(gw, gw_dtype)
            gb_op = None if gb is None else planner.Operand.of(gb, gb_dtype)
            x_op, g_op = planner.Operand.of(x, x_dtype), planner.Operand.of(g, x_dtype)
            dx_op = None if dx is None else planner.Operand.of(dx, x_dtype)
            if gw_op is not None and gb_op is not None and gw_dtype != gb_dtype:
                plan = (planner.plan_groups_backward(g_op, x_op, dx_op, layout, st[0], st[1], w_op, gw_op, None,
                                                     sums, ws, device=device)
                        + planner.plan_groups_backward(g_op, x_op, None, layout, st[0], st[1], w_op, None, gb_op,
                                                       None, ws, device=device))
            else:
                plan = planner.plan_groups_backward(g_op, x_op, dx_op, layout, st[0], st[1], w_op, gw_op, gb_op,
                                                    sums, ws, device=device)
            launcher.launch(plan)
    out_dx = None if native_dx is None else interop.to_native(input, native_dx)
    return out_dx, *_native_params(input, gw_dtype, (gw,)), *_native_params(input, gb_dtype, (gb,))


def _dtype_name(a):
    from . import interop

    return interop.as_cupy(a, "parameter")[1]


def layer_norm_backward(grad_output, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    """GPU path of ``cupybn.native.layer_norm_backward``: ``(grad_input, grad_weight, grad_bias)``,
    the parameter gradients shaped ``normalized_shape`` in the weight's (bias's) dtype, else the
    input's. Up to 4 launches (``planner.plan_groups_backward``): per-row sums and dx; dgamma /
    dbeta as a two-stage coalesced column reduction. Deterministic, no float atomics, no host sync."""
    from . import planner

    shape = tuple(int(s) for s in normalized_shape)
    w_d = None if weight is None else _dtype_name(weight)
    b_d = None if bias is None else _dtype_name(bias)
    dx, gw, gb = _groups_backward(grad_output, input, lambda s: planner.layer_norm_layout(s, shape), mean, rstd,
                                  weight, lambda x: w_d or x, lambda x: b_d or w_d or x, output_mask,
                                  lambda s: math.prod(shape))
    return dx, None if gw is None else gw.reshape(shape), None if gb is None else gb.reshape(shape)


def group_norm_backward(grad_output, input, mean, rstd, weight, num_groups, output_mask):
    """GPU path of ``cupybn.native.group_norm_backward``: ``(grad_input, grad_weight, grad_bias)``,
    ``(C,)`` parameter gradients in the weight's dtype (else the input's). See
    :func:`layer_norm_backward`."""
    from . import planner

    grp = int(num_groups)
    w_d = None if weight is None else _dtype_name(weight)
    return _groups_backward(grad_output, input, lambda s: planner.group_norm_layout(s, grp), mean, rstd, weight,
                            lambda x: w_d or x, lambda x: w_d or x, output_mask, lambda s: s[1])


def native_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    """GPU path of ``cupybn.native.native_instance_norm`` with ``use_input_stats``: ``(output,
    save_mean, save_invstd)``, the statistics ``(N*C,)`` in the accumulation dtype. The fused forward
    (:func:`instance_norm_forward`, running statistics updated in place) and the statistics launch
    (``moments_forward`` over the ``(1, N*C, spatial)`` view, batch norm's zero-variance rule):
    2 launches, no host sync."""
    _require_cupy()
    from . import interop, planner
    from .launchers import cupy_launcher

    if not use_input_stats:
        raise NotImplementedError("native_instance_norm without use_input_stats goes through native_batch_norm")
    y = instance_norm_forward(input, running_mean, running_var, weight, bias, momentum, eps)
    launcher = cupy_launcher()
    with interop.input_stream(input):
        import cupy

        x, x_dtype = interop.as_cupy(input, "input")
        x = interop.contiguous(x)
        n, c = int(x.shape[0]), int(x.shape[1])
        spatial = math.prod(int(s) for s in x.shape[2:])
        acc = planner.accumulation_dtype(x_dtype)
        mean = cupy.empty((n * c,), dtype=acc)
        invstd = cupy.empty((n * c,), dtype=acc)
        mean.fill(0)
        invstd.fill(0)
        if x.size:
            plan = planner.plan_moments(planner.Operand.of(x, x_dtype), (1, n * c, spatial),
                                        planner.Operand.of(mean), planner.Operand.of(invstd), eps,
                                        device=launcher.device_info(), columns=False)
            launcher.launch(plan)
    return y, _native_vector(input, mean), _native_vector(input, invstd)


def instance_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean, save_invstd,
                           use_input_stats, eps, output_mask):
    """GPU path of ``cupybn.native.instance_norm_backward`` with ``use_input_stats``: the group
    backward (:func:`layer_norm_backward`) over the ``(N*C, spatial)`` groups with the saved
    statistics; ``(C,)`` parameter gradients summed over the batch, in the weight's dtype (else the
    input's)."""
    from . import planner

    if not use_input_stats:
        return _instance_norm_eval_backward(grad_output, input, weight, running_mean, running_var, eps, output_mask)
    w_d = None if weight is None else _dtype_name(weight)
    return _groups_backward(grad_output, input, planner.instance_norm_layout, save_mean, save_invstd, weight,
                            lambda x: w_d or x, lambda x: w_d or x, output_mask, lambda s: s[1])


def _instance_norm_eval_backward(grad_output, input, weight, running_mean, running_var, eps, output_mask):
    """Instance norm on running statistics (``use_input_stats=False``), backward.

    ``grad_input`` is batch norm's eval ``dy * invstd * weight`` (:func:`batch_norm_backward`).
    ``grad_weight`` / ``grad_bias`` are summed per sample first, as ATen computes them (batch norm on
    the ``(1, N*C, *)`` view, weight repeated per sample): ``sum_n(sum(dy * (x - mean)) * invstd)``.
    With ``invstd = inf`` (running variance 0, ``eps == 0``) samples of opposite signs give NaN where
    batch norm's per-channel total gives +-inf. So the reduction launch runs on the ``(1, N*C, L)``
    view with the running statistics repeated per sample (accumulation dtype), and the ``(N, C)``
    results are added over the batch here (one small CuPy reduction). A rare path: batch norm's
    own backward keeps its two launches.
    """
    _require_cupy()
    from . import interop, planner
    from .launchers import cupy_launcher

    mask = tuple(bool(m) for m in output_mask)
    dx = None
    if mask[0]:
        dx = batch_norm_backward(grad_output, input, weight, running_mean, running_var, None, None, False, eps,
                                 (True, False, False))[0]
    if not (mask[1] or mask[2]):
        return dx, None, None
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when use_input_stats=False")
    launcher = cupy_launcher()
    with interop.input_stream(input):
        import cupy

        x, x_dtype, g = _input_and_grad(input, grad_output)
        acc = planner.accumulation_dtype(x_dtype)
        n, c = int(x.shape[0]), int(x.shape[1])
        spatial = math.prod(int(s) for s in x.shape[2:])
        stats = []
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            arr = interop.cast(*_channel_vector(a, name, c), acc)
            stats.append(planner.Operand.of(cupy.ascontiguousarray(cupy.broadcast_to(arr, (n, c))).reshape(n * c),
                                            acc))
        per = {k: cupy.empty((n * c,), dtype=acc) if m else None for k, m in (("gw", mask[1]), ("gb", mask[2]))}
        if x.size == 0:
            for a in per.values():
                if a is not None:
                    a.fill(0)
        else:
            view = (1, n * c, spatial)
            plan = planner.plan_batch_norm_backward(
                planner.Operand.of(g.reshape(view), x_dtype), planner.Operand.of(x.reshape(view), x_dtype), None,
                stats[0], stats[1], False, None,
                None if per["gw"] is None else planner.Operand.of(per["gw"], acc),
                None if per["gb"] is None else planner.Operand.of(per["gb"], acc), None, eps,
                device=launcher.device_info())
            launcher.launch(plan)
        w, w_dtype = interop.as_cupy(weight, "weight")
        p = w_dtype if w is not None else x_dtype
        out = [None if a is None else _narrow(a.reshape(n, c).sum(axis=0), acc, p) for a in per.values()]
    return (dx, *_native_params(input, p, out))


def _narrow(a, acc, p):
    """An accumulation-dtype CuPy vector as dtype ``p``'s storage, rounded to nearest even
    (bfloat16 by hand on the bits, as kernels/cupybn.cuh's conversion: CuPy has no bfloat16)."""
    import cupy

    from . import planner

    if p == acc:
        return a
    if p != "bfloat16":
        return a.astype(planner.storage_dtype(p))
    f = a.astype(cupy.float32)
    u = f.view(cupy.uint32)
    rounded = ((u + cupy.uint32(0x7FFF) + ((u >> 16) & cupy.uint32(1))) >> 16).astype(cupy.uint16)
    quiet = ((u >> 16) | cupy.uint32(0x40)).astype(cupy.uint16)  # NaN stays a (quiet) NaN
    return cupy.where((u & cupy.uint32(0x7FFFFFFF)) > cupy.uint32(0x7F800000), quiet, rounded)
