"""Backward launches: BatchNorm (:func:`plan_batch_norm_backward`, kernels/batch_norm_backward.cu)
and the contiguous-group norms (:func:`plan_groups_backward`, kernels/groups_backward.cu).

BatchNorm backward (:func:`plan_batch_norm_backward`, kernels/batch_norm_backward.cu) is at most
two launches: a per-channel reduction of ``sum(dy)`` and ``sum(dy * (x - mean))`` on
``moments_tiling``'s split (blocks per channel, fixed-order last-block combine, self-resetting
counters) that also writes ``grad_weight`` / ``grad_bias``, then the elementwise ``dx`` on
``normalize_tiling``. Training: dy and x read twice, dx written once; eval ``dx`` alone: one
launch reading dy once. The kernels are instantiated per ``(x, stats, parameter)`` dtype triple of
:func:`backward_stats_params`.

Layer, group and instance norm backward (:func:`plan_groups_backward`) is at most four launches:
with ``grad_input``, a block-per-group reduction then an elementwise ``dx``; with parameter
gradients, a two-stage column reduction over chunks of samples (:func:`groups_backward_chunks`,
workspace :func:`groups_backward_workspace`) combined in a fixed order.
"""
from __future__ import annotations

import math

import numpy as np

from .dtypes import SCALAR_TYPES, accumulation_dtype, cxx_type, itemsize, type_code
from .groups import GroupsLayout
from .instantiations import (_BN_BACKWARD_DX, _BN_BACKWARD_REDUCE, _GB_COMBINE, _GB_DX, _GB_PARTIAL, _GB_REDUCE,
                             _instantiation, backward_stats_params, declared_signature)
from .launch import COUNTERS, SCRATCH, DeviceInfo, KernelLaunch, Operand, _require_vector
from .moments import moments_tiling
from .normalize import normalize_tiling

BACKWARD_THREADS = 256  # kernels/batch_norm_backward.cu kBackwardThreads


def plan_batch_norm_backward(grad_output: Operand, x: Operand, grad_input: Operand | None, mean: Operand,
                             stat: Operand, train: bool, weight: Operand | None, grad_weight: Operand | None,
                             grad_bias: Operand | None, sums: Operand | None, eps: float,
                             device: DeviceInfo = DeviceInfo(), splits: int | None = None,
                             threads: int | None = None) -> tuple[KernelLaunch, ...]:
    """Launches of BatchNorm's backward (``kernels/batch_norm_backward.cu``).

    ``grad_output``, ``x``, ``grad_input`` (None: not asked for): contiguous ``(N, C, *spatial)`` of
    one float dtype. ``train``: ``mean`` / ``stat`` are ``save_mean`` / ``save_invstd``; else
    ``running_mean`` / ``running_var`` (the kernels fold ``1 / sqrt(var + eps)``). ``mean`` and
    ``stat`` share a dtype ``S``; ``weight`` (optional), ``grad_weight`` / ``grad_bias`` (optional
    ``(C,)`` outputs) share a dtype ``P``, and ``(S, P)`` is one of :func:`backward_stats_params`.
    ``sums``: ``(3 * C,)`` in the accumulation dtype, required when the reduction runs with
    ``train`` and ``grad_input`` (scratch between the two launches).

    Launches: the per-channel reduction (moments_tiling's split, deterministic cross-block combine)
    when training with ``grad_input`` or when ``grad_weight`` / ``grad_bias`` are asked for; then the
    elementwise dx when ``grad_input`` is asked for. At most 2; an empty input: none.
    """
    if len(x.shape) < 2:
        raise ValueError(f"batch norm needs an (N, C, ...) input, got shape {x.shape}")
    if grad_output.shape != x.shape or grad_output.dtype != x.dtype:
        raise ValueError(f"grad_output {grad_output.shape} {grad_output.dtype} does not match input "
                         f"{x.shape} {x.dtype}")
    if grad_input is not None and (grad_input.shape != x.shape or grad_input.dtype != x.dtype):
        raise ValueError(f"grad_input {grad_input.shape} {grad_input.dtype} does not match input")
    for name, op in (("input", x), ("grad_output", grad_output), ("grad_input", grad_input)):
        if op is not None and not op.is_contiguous():
            raise ValueError(f"the backward kernels need contiguous {name} (strides {op.strides})")
    channels = x.shape[1]
    for name, op in (("mean", mean), ("stat", stat)):
        _require_vector(name, op, channels, optional=False)
    for name, op in (("weight", weight), ("grad_weight", grad_weight), ("grad_bias", grad_bias)):
        _require_vector(name, op, channels, optional=True)
    if stat.dtype != mean.dtype:
        raise TypeError(f"mean is {mean.dtype} but the second statistic is {stat.dtype}")
    params = {op.dtype for op in (weight, grad_weight, grad_bias) if op is not None}
    if len(params) > 1:
        raise TypeError(f"weight / grad_weight / grad_bias of different dtypes {sorted(params)}")
    p = params.pop() if params else accumulation_dtype(x.dtype)
    if (mean.dtype, p) not in backward_stats_params(x.dtype):
        raise TypeError(f"no backward kernel for statistics of {mean.dtype} with parameters of {p} "
                        f"({x.dtype} input); convert the statistics to {accumulation_dtype(x.dtype)}")
    acc = accumulation_dtype(x.dtype)
    n = x.shape[0]
    inner = math.prod(x.shape[2:])
    if x.size == 0:
        return ()
    accs = SCALAR_TYPES[type_code(acc)]
    kind = np.int32(1 if train else 0)
    plan = []
    need_sums = grad_weight is not None or grad_bias is not None or (train and grad_input is not None)
    if need_sums:
        if train and grad_input is not None:
            if sums is None or sums.shape != (3 * channels,) or sums.dtype != acc:
                raise ValueError(f"sums must be a ({3 * channels},) {acc} vector")
        tiling = moments_tiling(n, channels, inner, x.dtype, device, splits, threads)
        source, kernel = _instantiation("batch_norm_backward.cu", _BN_BACKWARD_REDUCE.format(
            T=cxx_type(x.dtype), S=cxx_type(mean.dtype), P=cxx_type(p)))
        args = (grad_output.buf, x.buf, np.int64(n), np.int64(channels), np.int64(inner), np.int32(tiling.splits),
                mean.buf, stat.buf, kind, accs(eps), None if sums is None else sums.buf,
                None if grad_weight is None else grad_weight.buf, None if grad_bias is None else grad_bias.buf,
                SCRATCH if tiling.splits > 1 else None, COUNTERS)
        plan.append(KernelLaunch(source=source, kernel=kernel, grid=tiling.grid, block=tiling.block, args=args,
                                 signature=declared_signature(source, kernel),
                                 workspace_bytes=tiling.grid[0] * 3 * itemsize(acc) if tiling.splits > 1 else 0,
                                 counter_words=tiling.slots,
                                 notes={"view": (n, channels, inner), "slots": tiling.slots,
                                        "splits": tiling.splits, "vector": tiling.vector,
                                        "vectors_per_thread": tiling.vectors_per_thread}))
    if grad_input is not None:
        cols = channels * inner
        tiling = normalize_tiling(n, cols, x.dtype, device)
        source, kernel = _instantiation("batch_norm_backward.cu", _BN_BACKWARD_DX.format(
            T=cxx_type(x.dtype), S=cxx_type(mean.dtype), P=cxx_type(p)))
        args = (grad_output.buf, x.buf, grad_input.buf, np.int64(n), np.int64(cols), np.int64(inner),
                mean.buf, stat.buf, kind, None if weight is None else weight.buf, accs(eps),
                sums.buf if train else None, accs(n * inner), np.int32(1 if train else 0))
        plan.append(KernelLaunch(source=source, kernel=kernel, grid=tiling.grid, block=tiling.block, args=args,
                                 signature=declared_signature(source, kernel),
                                 notes={"rows": n, "cols": cols, "inner": inner, "vector": tiling.vector,
                                        "rows_per_thread": tiling.rows_per_thread}))
    return tuple(plan)


GROUPS_BACKWARD_THREADS = 256  # kernels/groups_backward.cu kGroupsBackwardThreads


def plan_groups_backward(grad_output: Operand, x: Operand, grad_input: Operand | None, layout: GroupsLayout,
                         mean: Operand, rstd: Operand, weight: Operand | None, grad_weight: Operand | None,
                         grad_bias: Operand | None, sums: Operand | None, workspace: Operand | None,
                         device: DeviceInfo = DeviceInfo(), chunks: int | None = None) -> tuple[KernelLaunch, ...]:
    """Launches of the backward of the contiguous-group norms (``kernels/groups_backward.cu``).

    ``grad_output``, ``x``, ``grad_input`` (None: not asked for): contiguous, one float dtype, covered
    by ``layout``. ``mean`` / ``rstd``: ``(groups,)`` in the accumulation dtype. ``weight`` (optional),
    ``grad_weight`` / ``grad_bias`` (optional outputs): ``per_sample`` values of one dtype ``P``.
    ``sums``: ``(2 * groups,)`` accumulation dtype, required with ``grad_input``. ``workspace``:
    accumulation dtype, at least :func:`groups_backward_workspace` values, required with
    ``grad_weight`` / ``grad_bias``.

    Launches: with ``grad_input``, a block-per-group reduction of ``sum(g)`` / ``sum(g * xhat)``
    (``g = dy * weight``) and an elementwise dx (grid-stride, one wave); with parameter gradients,
    a two-stage column reduction (partial sums per chunk of samples, thread per parameter, then a
    fixed-order combine over chunks). At most 4; deterministic, no float atomics, no host sync.
    """
    if grad_output.shape != x.shape or grad_output.dtype != x.dtype:
        raise ValueError(f"grad_output {grad_output.shape} {grad_output.dtype} does not match input")
    if grad_input is not None and (grad_input.shape != x.shape or grad_input.dtype != x.dtype):
        raise ValueError("grad_input does not match input")
    for name, o in (("input", x), ("grad_output", grad_output), ("grad_input", grad_input)):
        if o is not None and not o.is_contiguous():
            raise ValueError(f"the backward kernels need contiguous {name}")
    if layout.groups * layout.length != x.size:
        raise ValueError(f"layout {layout} does not cover x of shape {x.shape}")
    acc = accumulation_dtype(x.dtype)
    for name, o in (("mean", mean), ("rstd", rstd)):
        if o.size != layout.groups or o.dtype != acc:
            raise ValueError(f"{name} must be ({layout.groups},) {acc}")
    per_sample = layout.length // layout.inner * layout.groups_per_sample
    for name, o in (("weight", weight), ("grad_weight", grad_weight), ("grad_bias", grad_bias)):
        if o is not None and (o.size != per_sample or not o.is_contiguous()):
            raise ValueError(f"{name} must be {per_sample} contiguous values")
    if x.size == 0:
        return ()
    plan = []
    tc, pc = cxx_type(x.dtype), cxx_type(weight.dtype if weight is not None else acc)
    common = (np.int64(layout.groups), np.int64(layout.length), np.int64(layout.groups_per_sample),
              np.int64(layout.inner))
    if grad_input is not None:
        if sums is None or sums.size != 2 * layout.groups or sums.dtype != acc:
            raise ValueError(f"sums must be a ({2 * layout.groups},) {acc} vector")
        if layout.groups > device.max_grid_x:
            raise ValueError(f"{layout.groups} groups need more blocks than CUDA's grid limit")
        w = None if weight is None else weight.buf
        source, kernel = _instantiation("groups_backward.cu", _GB_REDUCE.format(T=tc, P=pc))
        plan.append(KernelLaunch(source=source, kernel=kernel, grid=(layout.groups, 1, 1),
                                 block=(GROUPS_BACKWARD_THREADS, 1, 1),
                                 args=(grad_output.buf, x.buf) + common + (mean.buf, rstd.buf, w, sums.buf),
                                 signature=declared_signature(source, kernel), notes={"layout": layout}))
        resident = max(1, device.sm_count * (device.max_threads_per_sm // GROUPS_BACKWARD_THREADS))
        grid = (max(1, min(-(-x.size // GROUPS_BACKWARD_THREADS), resident)), 1, 1)
        source, kernel = _instantiation("groups_backward.cu", _GB_DX.format(T=tc, P=pc))
        plan.append(KernelLaunch(source=source, kernel=kernel, grid=grid, block=(GROUPS_BACKWARD_THREADS, 1, 1),
                                 args=(grad_output.buf, x.buf, grad_input.buf) + common
                                 + (mean.buf, rstd.buf, w, sums.buf),
                                 signature=declared_signature(source, kernel), notes={"layout": layout}))
    if grad_weight is not None or grad_bias is not None:
        gp = (grad_weight if grad_weight is not None else grad_bias).dtype
        if grad_weight is not None and grad_bias is not None and grad_weight.dtype != grad_bias.dtype:
            raise TypeError("grad_weight and grad_bias of different dtypes")
        samples = layout.groups // layout.groups_per_sample
        n_chunks, per_chunk = groups_backward_chunks(layout, device, chunks)
        need = groups_backward_workspace(layout, device, chunks)
        if workspace is None or workspace.size < need or workspace.dtype != acc:
            raise ValueError(f"workspace must hold {need} {acc} values")
        cols = (-(-per_sample // GROUPS_BACKWARD_THREADS), n_chunks, 1)
        source, kernel = _instantiation("groups_backward.cu", _GB_PARTIAL.format(T=tc))
        plan.append(KernelLaunch(source=source, kernel=kernel, grid=cols, block=(GROUPS_BACKWARD_THREADS, 1, 1),
                                 args=(grad_output.buf, x.buf, np.int64(samples), np.int64(per_sample),
                                       np.int64(layout.inner), np.int64(layout.groups_per_sample), mean.buf,
                                       rstd.buf, np.int64(per_chunk), workspace.buf),
                                 signature=declared_signature(source, kernel),
                                 notes={"chunks": n_chunks, "samples_per_chunk": per_chunk}))
        source, kernel = _instantiation("groups_backward.cu", _GB_COMBINE.format(T=cxx_type(acc), P=cxx_type(gp)))
        plan.append(KernelLaunch(source=source, kernel=kernel, grid=(cols[0], 1, 1),
                                 block=(GROUPS_BACKWARD_THREADS, 1, 1),
                                 args=(workspace.buf, np.int64(n_chunks), np.int64(per_sample),
                                       None if grad_weight is None else grad_weight.buf,
                                       None if grad_bias is None else grad_bias.buf),
                                 signature=declared_signature(source, kernel), notes={"chunks": n_chunks}))
    return tuple(plan)


def groups_backward_chunks(layout: GroupsLayout, device: DeviceInfo = DeviceInfo(),
                           chunks: int | None = None) -> tuple[int, int]:
    """``(chunks, samples per chunk)`` of the parameter-gradient column reduction: about 4 blocks per
    SM, at least 32 samples (rows) per chunk so the workspace stays small next to dy / x, at most
    1024 chunks (``chunks`` forces a count)."""
    samples = max(1, layout.groups // layout.groups_per_sample)
    per_sample = layout.length // layout.inner * layout.groups_per_sample
    col_blocks = max(1, -(-per_sample // GROUPS_BACKWARD_THREADS))
    if chunks is None:
        chunks = max(1, min(samples, 1024, device.max_grid_y, -(-4 * device.sm_count // col_blocks),
                            -(-samples // 32)))
    chunks = max(1, min(chunks, samples))
    per_chunk = -(-samples // chunks)
    return -(-samples // per_chunk), per_chunk


def groups_backward_workspace(layout: GroupsLayout, device: DeviceInfo = DeviceInfo(),
                              chunks: int | None = None) -> int:
    """Accumulation-dtype values of the parameter-gradient workspace of :func:`plan_groups_backward`."""
    per_sample = layout.length // layout.inner * layout.groups_per_sample
    return 2 * groups_backward_chunks(layout, device, chunks)[0] * per_sample
