"""Layer, group and instance norm forward: :func:`plan_groups_forward` over a :class:`GroupsLayout`
(kernels/fused_groups.cu).

Layer, group and instance norm (``plan_groups_forward``, kernel ``kernels/fused_groups.cu``)
------------------------------------------------------------------------------------------
All three normalize *contiguous* groups of ``L`` values (layer norm: rows of
``prod(normalized_shape)``; group norm: ``C / G * spatial`` per sample and group; instance norm:
``spatial`` per sample and channel) with an affine index ``(g % groups_per_sample) * (L / inner) +
j / inner`` (:class:`GroupsLayout`). Paths, chosen from ``ceil(L / V)`` vectors per group:

* ``<= 128`` vectors (f16/bf16/f32): **warp per group**, group in registers (<= 4 vectors per
  lane), blocks of 8 warps; 1 launch, x read once;
* fits in 32 KiB of shared memory (8192 f16/bf16/f32, 4096 f64 values): **block per group**,
  ``ceil(vectors / 4)`` threads (64..512), group staged in shared memory; 1 launch, x read once;
* larger, with ``groups >= sm_count`` (or instance-norm running statistics, or ``eps == 0`` for
  layer/group norm): **block per group re-reading x**; 1 launch, x read twice;
* larger and fewer groups than SMs: **split** -- ``moments_forward`` over ``(1, groups, L)`` with
  many blocks per group (``moments_tiling``), then ``normalize_groups``; 2 launches, x read twice.

Instance norm's running statistics are updated by the fused launch's last block (integer ticket,
average over the batch in sample order, counter reset): no extra launch, no host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .dtypes import SCALAR_TYPES, accumulation_dtype, cxx_type, itemsize, type_code, vector_width
from .instantiations import _FUSED, _GROUP_NORMALIZE, _instantiation, declared_signature
from .launch import COUNTERS, SCRATCH, DeviceInfo, KernelLaunch, Operand, _require_vector
from .moments import plan_moments

#: kernels/fused_groups.cu kFusedThreads, kMaxTeams, kGroupNormalizeThreads
FUSED_THREADS, FUSED_MAX_TEAMS, GROUP_NORMALIZE_THREADS = 512, 16, 256
#: shared memory that stages a fused block's groups (kernels/fused_groups.cu kStageBytes, static)
FUSED_SMEM_LIMIT = 32 * 1024
#: a warp owns a group when it holds at most this many 16-byte vectors per lane
FUSED_WARP_VECTORS = 4
#: vectors per thread a block-per-group team aims for (team = ceil(vectors / this), 64..512 threads)
FUSED_BLOCK_VECTORS = 4
#: where fused_groups keeps a group between its passes, per path (kernels/fused_groups.cu Keep)
_KEEP = {"long": 0, "block": 1, "warp": 2}
#: running-statistics type codes of kernels/fused_groups.cu (RunningType)
_RUNNING_TYPES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}


@dataclass(frozen=True)
class GroupsLayout:
    """Contiguous groups of ``length`` elements (see kernels/fused_groups.cu): ``groups`` groups,
    affine index of element ``j`` of group ``g`` = ``(g % groups_per_sample) * (length // inner) + j // inner``."""

    groups: int
    length: int
    groups_per_sample: int
    inner: int


def fused_tiling(layout: GroupsLayout, dtype: str, smem_limit: int = FUSED_SMEM_LIMIT,
                 path: str | None = None) -> tuple[str, tuple[int, int, int], tuple[int, int, int], int]:
    """``(path, grid, block, staged bytes)`` of ``fused_groups`` (heuristics in :func:`plan_groups_forward`).
    ``smem_limit`` (at most FUSED_SMEM_LIMIT) caps the staged bytes: tests lower it to reach the long-row path."""
    smem_limit = min(smem_limit, FUSED_SMEM_LIMIT)
    v = vector_width(dtype)
    vectors = -(-layout.length // v)
    row_bytes = vectors * v * itemsize(accumulation_dtype(dtype))
    if path is None:
        if vectors <= 32 * FUSED_WARP_VECTORS and dtype != "float64":
            path = "warp"
        elif row_bytes <= smem_limit:
            path = "block"
        else:
            path = "long"
    if path == "warp":
        if vectors > 32 * FUSED_WARP_VECTORS or dtype == "float64":
            raise ValueError(f"no warp-per-group kernel for {layout.length} {dtype} elements")
        block = (32, max(1, min(FUSED_MAX_TEAMS // 2, layout.groups)), 1)
        smem = 0  # registers
    else:
        team = -(-vectors // FUSED_BLOCK_VECTORS)
        team = max(64, min(FUSED_THREADS, -(-team // 32) * 32))
        block = (team, 1, 1)
        smem = row_bytes if path == "block" else 0
    if path in ("warp", "block") and smem > min(smem_limit, FUSED_SMEM_LIMIT):
        raise ValueError(f"a group of {layout.length} elements does not fit in {smem_limit} bytes of shared memory")
    grid = (-(-layout.groups // block[1]), 1, 1)
    return path, grid, block, smem


def plan_groups_forward(x: Operand, y: Operand, layout: GroupsLayout, weight: Operand | None,
                        bias: Operand | None, eps: float, zero_var_rule: bool,
                        running_mean: Operand | None = None, running_var: Operand | None = None,
                        momentum: float = 0.1, save: tuple[Operand, Operand, Operand] | None = None,
                        device: DeviceInfo = DeviceInfo(), path: str | None = None,
                        smem_limit: int = FUSED_SMEM_LIMIT, splits: int | None = None,
                        threads: int | None = None) -> tuple[KernelLaunch, ...]:
    """Launches normalizing the contiguous groups of ``x`` (layer, group and instance norm forward).

    Paths (``path`` forces one; tests use it with a small ``smem_limit``):

    * ``"warp"`` -- a group of at most ``32 * 4`` 16-byte vectors (512 f32, 1024 f16/bf16 values;
      not float64, whose short groups take the block path): a warp per group, 8 groups per 256-thread block (fewer groups: fewer warps).
      Each lane loads its <= 4 vectors once into registers (accumulation dtype), the warp reduces
      with shuffles, normalizes from registers, writes once. 1 launch, x read once.
    * ``"block"`` -- a group that fits in ``smem_limit`` (32 KiB of static shared memory: 8192
      f16/bf16/f32 values, 4096 f64): a block per group, ``ceil(vectors / 4)`` threads rounded to warps, 64..512, so each
      thread loads ~4 vectors; reduced with ``block_reduce``. 1 launch, x read once.
    * ``"long"`` -- larger groups, when there are enough of them to fill the GPU
      (``groups >= sm_count``), or instance norm with running statistics, or ``eps == 0`` for
      layer/group norm: a 512-thread block per group reads the group twice (statistics, normalize).
      1 launch, x read twice.
    * ``"split"`` -- otherwise (few huge groups): statistics with many blocks per group
      (``moments_forward`` over the ``(1, groups, L)`` view, :func:`plan_moments`, into ``save``),
      then ``normalize_groups`` (grid-stride over all vectors, one wave of 256-thread blocks).
      2 launches, x read twice.

    Instance norm's running statistics (``running_mean`` / ``running_var``, one float dtype,
    updated in place) are folded into the fused kernel: the last block to finish averages the
    per-instance (mean, var) over the batch in sample order (workspace ``2 * groups`` values,
    one counter) -- no extra launch, no float atomics, no host sync.
    """
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"output {y.shape} {y.dtype} does not match input {x.shape} {x.dtype}")
    if not x.is_contiguous() or not y.is_contiguous():
        raise ValueError("the group kernels need contiguous input and output")
    if layout.groups * layout.length != x.size:
        raise ValueError(f"layout {layout} does not cover x of shape {x.shape}")
    if x.size == 0:
        return ()
    per_sample = layout.length // layout.inner * layout.groups_per_sample
    for name, op in (("weight", weight), ("bias", bias)):
        if op is not None and op.size != per_sample:
            raise ValueError(f"{name} must hold {per_sample} values, got shape {op.shape}")
        if op is not None and not op.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"weight is {weight.dtype} but bias is {bias.dtype}; convert the parameters to one dtype first")
    params = next((op.dtype for op in (weight, bias) if op is not None), accumulation_dtype(x.dtype))
    acc = accumulation_dtype(x.dtype)
    accs = SCALAR_TYPES[type_code(acc)]
    running = running_mean is not None
    if running != (running_var is not None):
        raise ValueError("running_mean and running_var go together")
    if running:
        _require_vector("running_mean", running_mean, layout.groups_per_sample, optional=False)
        _require_vector("running_var", running_var, layout.groups_per_sample, optional=False)
        if running_mean.dtype != running_var.dtype:
            raise TypeError(f"running_mean is {running_mean.dtype} but running_var is {running_var.dtype}")
    if path is None:
        vectors = -(-layout.length // vector_width(x.dtype))
        fits = vectors * vector_width(x.dtype) * itemsize(acc) <= min(smem_limit, FUSED_SMEM_LIMIT)
        few = layout.groups < device.sm_count
        if not fits and few and not running and save is not None and (zero_var_rule or eps != 0):
            path = "split"
    if path == "split":
        if running:
            raise ValueError("the split path does not update running statistics")
        if save is None:
            raise ValueError("the split path needs save = (mean, invstd, offset) buffers")
        mean, invstd, offset = save
        plan = plan_moments(x, (1, layout.groups, layout.length), mean, invstd, eps, device=device,
                            splits=splits, save_offset=offset, threads=threads, columns=False)
        units = layout.groups * -(-layout.length // vector_width(x.dtype))
        resident = max(1, device.sm_count * (device.max_threads_per_sm // GROUP_NORMALIZE_THREADS))
        grid = (max(1, min(-(-units // GROUP_NORMALIZE_THREADS), resident)), 1, 1)
        source, kernel = _instantiation("fused_groups.cu", _GROUP_NORMALIZE.format(T=cxx_type(x.dtype),
                                                                                  P=cxx_type(params)))
        args = (x.buf, y.buf, np.int64(layout.groups), np.int64(layout.length), np.int64(layout.groups_per_sample),
                np.int64(layout.inner), mean.buf, invstd.buf, offset.buf,
                None if weight is None else weight.buf, None if bias is None else bias.buf)
        return plan + (KernelLaunch(source=source, kernel=kernel, grid=grid, block=(GROUP_NORMALIZE_THREADS, 1, 1),
                                    args=args, signature=declared_signature(source, kernel),
                                    notes={"path": "split", "layout": layout}),)
    path, grid, block, smem = fused_tiling(layout, x.dtype, smem_limit, path)
    if grid[0] > device.max_grid_x:
        raise ValueError(f"{layout.groups} groups need more blocks than CUDA's grid limit")
    source, kernel = _instantiation("fused_groups.cu", _FUSED.format(T=cxx_type(x.dtype), P=cxx_type(params),
                                                                      R="true" if path == "warp" else "false"))
    args = (x.buf, y.buf, np.int64(layout.groups), np.int64(layout.length), np.int64(layout.groups_per_sample),
            np.int64(layout.inner), None if weight is None else weight.buf, None if bias is None else bias.buf,
            accs(eps), np.int32(bool(zero_var_rule)), np.int32(_KEEP[path]),
            running_mean.buf if running else None, running_var.buf if running else None,
            np.int32(_RUNNING_TYPES[running_mean.dtype] if running else 0),
            np.float64(momentum if running else 0.0),
            SCRATCH if running else None, COUNTERS if running else None)
    return (KernelLaunch(source=source, kernel=kernel, grid=grid, block=block, args=args,
                         signature=declared_signature(source, kernel),
                         workspace_bytes=2 * layout.groups * itemsize(acc) if running else 0,
                         counter_words=1 if running else 0,
                         notes={"path": path, "layout": layout}),)


def layer_norm_layout(shape: tuple[int, ...], normalized_shape: tuple[int, ...]) -> GroupsLayout:
    row = math.prod(normalized_shape)
    rows = math.prod(shape) // row if row else 0
    return GroupsLayout(rows, row, 1, 1)


def group_norm_layout(shape: tuple[int, ...], num_groups: int) -> GroupsLayout:
    n, c = shape[0], shape[1]
    spatial = math.prod(shape[2:])
    return GroupsLayout(n * num_groups, c // num_groups * spatial, num_groups, spatial)


def instance_norm_layout(shape: tuple[int, ...]) -> GroupsLayout:
    n, c = shape[0], shape[1]
    spatial = math.prod(shape[2:])
    return GroupsLayout(n * c, spatial, c, spatial)
