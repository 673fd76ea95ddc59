"""BatchNorm forward: the normalize launch (kernels/batch_norm.cu) of the eval forward
(:func:`plan_batch_norm_eval_forward`) and the training forward (:func:`plan_batch_norm_train_forward`).

Normalize launch heuristics (``normalize_tiling``)
--------------------------------------------------
A contiguous ``(N, C, *spatial)`` input is a ``rows x cols`` matrix: ``rows = N``,
``cols = C * inner``, ``inner = prod(spatial)``; column ``j`` belongs to channel ``j // inner``.

* **Vector width** ``V = 16 / itemsize`` (8 for f16/bf16, 4 for f32, 2 for f64): a thread moves
  its ``V`` elements of a row with one 16-byte load and one 16-byte store, the widest access a
  thread can issue; rows that are not 16-byte aligned fall back to element accesses in the
  kernel (``load_vec`` / ``store_vec``), so any shape and offset is legal.
* **Block** ``(bx, by)`` with ``bx * by <= 256`` threads (8 warps: enough loads in flight per SM
  at the occupancy the kernel's <= 64 registers allow, see ``__launch_bounds__(256)``).
  ``bx = min(256, ceil(cols / V))`` threads walk the columns of a row; when a row is narrower
  than a block, the remaining ``by = 256 // bx`` threads (capped by ``rows``) take further rows,
  so short rows (BatchNorm1d on ``(N, C)``) still fill warps with contiguous memory: a warp
  reads ``bx`` vectors of one row and continues into the next row, which follows in memory.
* **Elements per thread**: ``V`` per row visited. A thread computes the ``(center, scale,
  shift)`` of its ``V`` columns once (a division for the channel, a square root and a division
  per channel) and reuses it on every row it visits, so that per-channel math is amortized.
* **Grid** ``(gx, gy)``: ``gx = ceil(ceil(cols / V) / bx)`` covers every column exactly once.
  ``gy`` splits the rows: just enough blocks to fill the GPU once at full occupancy
  (``sm_count * 2048 / 256`` resident blocks), never more than the rows need
  (``ceil(rows / by)``) and at most 65535 (CUDA's limit on ``gridDim.y``). Threads then loop over
  rows with a stride of ``gy * by``. Filling the GPU once, rather than launching a block per
  row, keeps the amortized per-column work per thread high and leaves no partial last wave.
* **Shared memory / workspace**: none (the eval kernel keeps everything in registers).

The same tiling serves the training normalize (``kInvStd``), and layer/group/instance norm's
normalize step later: all of them are "per-element affine from per-group statistics".

A BatchNorm training forward is two launches: statistics with the running-stat update fused in
(:func:`plan_moments`), then the normalize (:func:`normalize_tiling`); x is read twice, y written
once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .dtypes import SCALAR_TYPES, accumulation_dtype, type_code, vector_width
from .instantiations import _instantiation, _normalize_expression, declared_signature
from .launch import DeviceInfo, KernelLaunch, Operand, _require_vector
from .moments import plan_moments

THREADS = 256  # threads per normalize block; kernels/batch_norm.cu kNormalizeThreads


@dataclass(frozen=True)
class Tiling:
    """Grid, block and per-thread work of the row/column normalize kernels."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    vector: int
    rows_per_thread: int


def normalize_tiling(rows: int, cols: int, dtype: str, device: DeviceInfo = DeviceInfo()) -> Tiling:
    """Grid and block for a ``rows x cols`` normalize (heuristics in the module docstring)."""
    if rows <= 0 or cols <= 0:
        raise ValueError("normalize_tiling needs a non-empty matrix")
    v = vector_width(dtype)
    vcols = -(-cols // v)
    bx = min(THREADS, vcols)
    by = max(1, min(THREADS // bx, rows))
    gx = -(-vcols // bx)
    if gx > device.max_grid_x:
        raise ValueError(f"rows of {cols} elements need {gx} blocks, more than CUDA's grid limit")
    resident = max(1, device.sm_count * (device.max_threads_per_sm // THREADS))
    gy = max(1, min(-(-rows // by), max(1, resident // gx), device.max_grid_y))
    return Tiling(grid=(gx, gy, 1), block=(bx, by, 1), vector=v, rows_per_thread=-(-rows // (gy * by)))


def _check_batch_norm_io(x: Operand, y: Operand) -> None:
    """Input and output of a batch-norm plan: contiguous ``(N, C, ...)`` of one shape and dtype."""
    if len(x.shape) < 2:
        raise ValueError(f"batch norm needs an (N, C, ...) input, got shape {x.shape}")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"output {y.shape} {y.dtype} does not match input {x.shape} {x.dtype}")
    if not x.is_contiguous() or not y.is_contiguous():
        raise ValueError("the normalize kernel needs contiguous input and output (strides "
                         f"{x.strides} / {y.strides} for shape {x.shape})")


def plan_batch_norm_eval_forward(x: Operand, y: Operand, running_mean: Operand, running_var: Operand,
                                 weight: Operand | None, bias: Operand | None, eps: float,
                                 device: DeviceInfo = DeviceInfo()) -> tuple[KernelLaunch, ...]:
    """Launches of BatchNorm's eval forward: ``y = (x - mean) * (invstd * weight) + bias``.

    ``x`` and ``y``: contiguous ``(N, C, *spatial)`` of one float dtype. ``running_mean`` and
    ``running_var`` share one float dtype, ``weight`` and ``bias`` (each optional) that same dtype
    (the caller converts mixed parameter dtypes first). Returns one launch, or none for an empty
    input. The kernel folds ``invstd = 1 / sqrt(running_var + eps)`` itself: no host sync.
    """
    _check_batch_norm_io(x, y)
    channels = x.shape[1]
    _require_vector("running_mean", running_mean, channels, optional=False)
    _require_vector("running_var", running_var, channels, optional=False)
    _require_vector("weight", weight, channels, optional=True)
    _require_vector("bias", bias, channels, optional=True)
    stats = running_mean.dtype
    if running_var.dtype != stats:
        raise TypeError(f"running_mean is {stats} but running_var is {running_var.dtype}")
    for name, op in (("weight", weight), ("bias", bias)):
        if op is not None and op.dtype != stats:
            raise TypeError(f"{name} is {op.dtype} but the running statistics are {stats}; "
                            "convert the parameters to one dtype first")
    if x.size == 0:
        return ()

    return (_normalize_launch(x, y, running_mean, running_var, weight, bias, eps, "kRunningVar", device),)


def _normalize_launch(x: Operand, y: Operand, mean: Operand, stat: Operand, weight: Operand | None,
                      bias: Operand | None, eps: float, kind: str, device: DeviceInfo,
                      offset: Operand | None = None) -> KernelLaunch:
    """The one normalize launch ``y = (x - mean) * (invstd * weight) + bias`` (non-empty x)."""
    rows = x.shape[0]
    inner = math.prod(x.shape[2:])
    cols = x.shape[1] * inner
    tiling = normalize_tiling(rows, cols, x.dtype, device)
    params = next((op.dtype for op in (weight, bias) if op is not None), mean.dtype) if kind == "kInvStd" \
        else mean.dtype
    source, kernel = _instantiation("batch_norm.cu", _normalize_expression(x.dtype, mean.dtype, params, kind))
    acc = SCALAR_TYPES[type_code(accumulation_dtype(x.dtype))]
    args = (x.buf, y.buf, np.int64(rows), np.int64(cols), np.int64(inner),
            mean.buf, stat.buf,
            None if weight is None else weight.buf, None if bias is None else bias.buf,
            acc(eps), None if offset is None else offset.buf)
    return KernelLaunch(source=source, kernel=kernel, grid=tiling.grid, block=tiling.block, args=args,
                        signature=declared_signature(source, kernel),
                        notes={"rows": rows, "cols": cols, "inner": inner, "vector": tiling.vector,
                               "rows_per_thread": tiling.rows_per_thread})


def plan_batch_norm_train_forward(x: Operand, y: Operand, save_mean: Operand, save_invstd: Operand,
                                  running_mean: Operand | None, running_var: Operand | None,
                                  num_batches_tracked: Operand | None, weight: Operand | None,
                                  bias: Operand | None, momentum: float | None, eps: float,
                                  device: DeviceInfo = DeviceInfo(), splits: int | None = None,
                                  save_offset: Operand | None = None,
                                  threads: int | None = None, columns: bool | None = None) -> tuple[KernelLaunch, ...]:
    """Launches of BatchNorm's training forward: statistics + fused running-stat update, then normalize.

    ``x``, ``y``: contiguous ``(N, C, *spatial)``. ``save_mean`` / ``save_invstd``: ``(C,)`` in the
    accumulation dtype (ATen's ``save_mean`` / ``save_invstd``; the normalize launch reads them, the
    backward will). Running statistics (optional, updated in place) share one float dtype;
    ``num_batches_tracked`` is a 0-d int64 (optional; required for ``momentum=None``). ``weight`` /
    ``bias`` share one float dtype. ``save_offset`` (``(C,)``, accumulation dtype; optional but
    what keeps large-mean inputs accurate) receives ``batch mean - save_mean``, folded into the
    normalize's shift. Two launches; an empty batch: only the counter launch (or none).
    """
    _check_batch_norm_io(x, y)
    channels = x.shape[1]
    _require_vector("weight", weight, channels, optional=True)
    _require_vector("bias", bias, channels, optional=True)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"weight is {weight.dtype} but bias is {bias.dtype}; convert the parameters to one dtype first")
    n = x.shape[0]
    inner = math.prod(x.shape[2:])
    if x.size and n * inner == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    plan = plan_moments(x, (n, channels, inner), save_mean, save_invstd, eps, running_mean, running_var,
                        num_batches_tracked, momentum, device, splits, save_offset=save_offset, threads=threads,
                        columns=columns)
    if x.size == 0:
        return plan
    return plan + (_normalize_launch(x, y, save_mean, save_invstd, weight, bias, eps, "kInvStd", device,
                                     save_offset),)
