"""The statistics step of every norm: :func:`plan_moments` (kernels/moments.cu).

Statistics launch heuristics (``moments_tiling``, kernel ``kernels/moments.cu``)
-------------------------------------------------------------------------------
Every norm's statistics step is a segmented reduction over a contiguous ``(A, C, L)`` view: one
(mean, var) per index of axis 1 over axes 0 and 2 (:func:`plan_moments`; batch norm is
``(N, C, spatial)``, instance norm ``(1, N*C, spatial)``, layer norm ``(1, rows, row)``, group
norm ``(1, N*G, C/G*spatial)``).

* **Unit of work**: one 16-byte vector, ``V = 16 / itemsize`` elements of one row of a group
  (rows of ``L`` elements; the last vector of a row may be partial, misaligned rows load element by
  element). A group has ``units = A * ceil(L / V)``.
* **Block**: 256 threads (8 warps; enough 16-byte loads in flight per SM at the 4-8 resident
  blocks the kernel's 40-62 registers allow), fewer -- a multiple of 32, at least one warp -- when
  a group has fewer than 256 units, so tiny groups do not launch idle warps.
* **Elements per thread**: a thread strides through its group's units by ``splits * block``
  (neighbouring threads read neighbouring vectors: coalesced), ``vectors_per_thread =
  ceil(units / (block * splits))`` vectors, each folded into its Welford state with one Chan
  combine (one division per vector).
* **Blocks per group** (``splits``): the grid is ``groups * splits`` blocks, decoupled from ``C``:
  ``splits = ceil(resident / groups)`` with ``resident = sm_count * max_threads_per_sm / 256``
  (one full wave: 1056 blocks on an H100), so ``C = 3`` still fills all 132 SMs, but capped so
  that every thread streams at least ``MOMENTS_MIN_VECTORS_PER_THREAD`` (4) vectors -- 16 KiB per
  block; fewer, larger blocks are cheaper than a partial combine per 4 KiB -- and at
  ``MOMENTS_MAX_SPLITS`` (1024) partials per group (the last block folds them with one warp).
  ``splits == 1`` needs no workspace and no cross-block step.
* **Cross-block combine**: each block writes its partial ``(n, mean, m2)`` to the workspace
  (``SCRATCH``, ``grid * (8 + 2 * sizeof(acc))`` bytes) and takes an integer ticket from its
  group's counter (``COUNTERS``, ``groups + 1`` words); the last block of a group combines all
  partials in index order (bitwise repeatable whatever the block order) and resets the counter;
  the last group to finish moves ``num_batches_tracked``. No float atomics, no memset, no host
  sync; the counters are zero again after every launch (graph-capture safe).

* **Groups of one element per row** (``L == 1``: BatchNorm on ``(N, C)``) with ``C >= 8 * V``
  run on ``moments_columns`` instead (:func:`column_moments_tiling`): a group per block would read
  one scalar per thread with a stride of ``C``. Blocks of ``(32, 8)`` threads cover a tile of
  ``32 * V`` channels (thread = one 16-byte vector of ``V`` channels of a row, 8 rows at a time),
  the grid is ``ceil(C / (32 * V))`` tiles x ``splits`` row ranges, ``splits`` chosen as above
  (one wave, >= 4 rows per thread, <= 1024). Same workspace protocol, ``32 * V`` partials per
  block. Below ``8 * V`` channels most lanes of a tile would idle, so the per-group kernel stays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import SCALAR_TYPES, accumulation_dtype, itemsize, type_code, vector_width
from .instantiations import _instantiation, _moments_expression, declared_signature
from .launch import COUNTERS, SCRATCH, DeviceInfo, KernelLaunch, Operand, _require_vector

MOMENTS_THREADS = 256  # kernels/moments.cu kMomentsThreads
#: a thread streams at least this many 16-byte vectors before the planner adds another block per group
MOMENTS_MIN_VECTORS_PER_THREAD = 4
#: most blocks per group: the last block folds this many partials (32 lanes, in order)
MOMENTS_MAX_SPLITS = 1024


@dataclass(frozen=True)
class MomentsTiling:
    """Grid of the statistics kernel: ``slots`` groups x ``splits`` blocks per group, 1-D."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    slots: int
    splits: int
    vector: int
    vectors_per_thread: int


def moments_tiling(a: int, groups: int, length: int, dtype: str, device: DeviceInfo = DeviceInfo(),
                   splits: int | None = None, threads: int | None = None) -> MomentsTiling:
    """Block size and blocks per group of the statistics kernel over an ``(a, groups, length)`` view.

    Heuristics (the module docstring explains them):

    * ``V = 16 / itemsize`` elements per unit; a group has ``units = a * ceil(length / V)`` units;
    * block: 256 threads (8 warps), fewer (a multiple of 32, at least one warp) when a group has
      fewer than 256 units;
    * blocks per group (``splits``): enough blocks to fill the GPU once at full occupancy
      (``sm_count * max_threads_per_sm / 256`` resident blocks) spread over the groups, but no more
      than keep every thread busy with >= MOMENTS_MIN_VECTORS_PER_THREAD vectors, at most
      MOMENTS_MAX_SPLITS, and within the grid limit. ``splits`` overrides the choice, ``threads``
      the block size (a multiple of 32 up to 256): tests use both to give small groups many
      non-empty blocks.
    """
    v = vector_width(dtype)
    slots = max(1, groups)
    units = a * -(-length // v)
    if threads is None:
        threads = MOMENTS_THREADS if units >= MOMENTS_THREADS else max(32, -(-units // 32) * 32)
    elif threads % 32 or not 32 <= threads <= MOMENTS_THREADS:
        raise ValueError(f"threads must be a multiple of 32 in [32, {MOMENTS_THREADS}], got {threads}")
    if splits is None:
        resident = max(1, device.sm_count * (device.max_threads_per_sm // MOMENTS_THREADS))
        by_device = -(-resident // slots)
        by_work = -(-units // (threads * MOMENTS_MIN_VECTORS_PER_THREAD))
        splits = max(1, min(by_device, by_work, MOMENTS_MAX_SPLITS))
    splits = max(1, min(int(splits), MOMENTS_MAX_SPLITS))
    splits = max(1, min(splits, device.max_grid_x // slots))
    if slots > device.max_grid_x:
        raise ValueError(f"{groups} groups need more blocks than CUDA's grid limit")
    return MomentsTiling(grid=(slots * splits, 1, 1), block=(threads, 1, 1), slots=slots, splits=splits,
                         vector=v, vectors_per_thread=-(-units // (threads * splits)) if units else 0)


#: rows x lanes of the column statistics kernel (kernels/moments.cu kColumnRows, kColumnLanes)
COLUMN_ROWS, COLUMN_LANES = 8, 32


def use_column_moments(a: int, groups: int, length: int, dtype: str) -> bool:
    """Whether the statistics of an ``(a, groups, length)`` view run on ``moments_columns``: groups of
    one element per row (``length == 1``, BatchNorm on ``(N, C)``) and at least ``8 * V`` groups,
    so a warp's 16-byte loads cover at least a quarter of its lanes. Otherwise a group per block
    (``moments_forward``) reads a strided column; with few channels that is the better trade."""
    return length == 1 and a > 0 and groups >= 8 * vector_width(dtype)


def column_moments_tiling(a: int, groups: int, dtype: str, device: DeviceInfo = DeviceInfo(),
                          splits: int | None = None) -> MomentsTiling:
    """Grid of ``moments_columns``: tiles of ``32 * V`` channels x ``splits`` row ranges, blocks of
    ``(32, 8)`` threads. ``splits`` fills the GPU once (as for ``moments_tiling``) but leaves every
    thread at least MOMENTS_MIN_VECTORS_PER_THREAD rows, at most MOMENTS_MAX_SPLITS."""
    v = vector_width(dtype)
    slots = -(-groups // (COLUMN_LANES * v))
    if splits is None:
        resident = max(1, device.sm_count * (device.max_threads_per_sm // MOMENTS_THREADS))
        by_work = -(-a // (COLUMN_ROWS * MOMENTS_MIN_VECTORS_PER_THREAD))
        splits = max(1, min(-(-resident // slots), by_work, MOMENTS_MAX_SPLITS))
    splits = max(1, min(int(splits), MOMENTS_MAX_SPLITS, device.max_grid_x // slots))
    return MomentsTiling(grid=(slots * splits, 1, 1), block=(COLUMN_LANES, COLUMN_ROWS, 1), slots=slots,
                         splits=splits, vector=v, vectors_per_thread=-(-a // (COLUMN_ROWS * splits)))


def plan_moments(x: Operand, view: tuple[int, int, int], save_mean: Operand, save_invstd: Operand, eps: float,
                 running_mean: Operand | None = None, running_var: Operand | None = None,
                 num_batches_tracked: Operand | None = None, momentum: float | None = 0.1,
                 device: DeviceInfo = DeviceInfo(), splits: int | None = None,
                 group_begin: int = 0, groups: int | None = None,
                 save_offset: Operand | None = None, threads: int | None = None,
                 columns: bool | None = None) -> tuple[KernelLaunch, ...]:
    """The statistics launch over the ``(A, C, L)`` view of a contiguous ``x``: per group ``c``,
    ``save_mean[c]`` and ``save_invstd[c] = 1 / sqrt(var + eps)`` (0 for var == eps == 0), with the
    optional running-statistics update fused (``momentum=None``: cumulative average with the
    device counter ``num_batches_tracked``, which moves by 1 per launch).

    The general entry point of every norm's statistics step (batch, instance, layer, group norm
    differ only in ``view``). ``save_*`` are ``(C,)`` vectors in the accumulation dtype;
    ``save_offset`` (optional) receives the exact remainder ``batch mean - save_mean`` that the
    normalize step folds into its shift (see kernels/moments.cu, "Shifted data").
    ``group_begin`` / ``groups`` restrict the launch to groups ``[group_begin, group_begin +
    groups)`` (tests use it to reach the far end of a huge logical tensor). Returns one launch, or
    none when there is nothing to compute and no counter to move.
    """
    a, c, l = (int(d) for d in view)
    if a * c * l != x.size:
        raise ValueError(f"view {view} does not cover x of shape {x.shape}")
    if not x.is_contiguous():
        raise ValueError(f"the statistics kernel needs contiguous input (strides {x.strides} for shape {x.shape})")
    acc = accumulation_dtype(x.dtype)
    for name, op in (("save_mean", save_mean), ("save_invstd", save_invstd), ("save_offset", save_offset)):
        _require_vector(name, op, c, optional=name == "save_offset")
        if op is not None and op.dtype != acc:
            raise TypeError(f"{name} must be {acc} (the accumulation dtype of {x.dtype}), got {op.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var go together")
    _require_vector("running_mean", running_mean, c, optional=True)
    _require_vector("running_var", running_var, c, optional=True)
    running = acc
    if running_mean is not None:
        running = running_mean.dtype
        if running_var.dtype != running:
            raise TypeError(f"running_mean is {running} but running_var is {running_var.dtype}")
    if num_batches_tracked is not None and num_batches_tracked.size != 1:
        raise ValueError("num_batches_tracked must hold one int64")
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise TypeError("momentum=None (cumulative average) needs num_batches_tracked")
    groups = c - group_begin if groups is None else int(groups)
    if not 0 <= group_begin <= c or groups < 0 or group_begin + groups > c:
        raise ValueError(f"groups [{group_begin}, {group_begin + groups}) outside [0, {c})")
    empty = a * l == 0 or groups == 0
    if empty and num_batches_tracked is None:
        return ()
    if columns is None:
        columns = not empty and group_begin == 0 and groups == c and use_column_moments(a, c, l, x.dtype)
    elif columns and (empty or l != 1 or group_begin != 0 or groups != c):
        raise ValueError("the column statistics kernel takes non-empty (A, C, 1) views, all groups")
    if empty:  # only the counter moves: one block per slot, nothing to read
        tiling = moments_tiling(0, groups, 0, x.dtype, device, splits=1)
    elif columns:
        tiling = column_moments_tiling(a, c, x.dtype, device, splits)
    else:
        tiling = moments_tiling(a, groups, l, x.dtype, device, splits, threads)
    source, kernel = _instantiation("moments.cu", _moments_expression(x.dtype, running, columns))
    accs = SCALAR_TYPES[type_code(acc)]
    nbt = None if num_batches_tracked is None else num_batches_tracked.buf
    cumulative = momentum is None
    args = (x.buf, np.int64(a), np.int64(c), np.int64(l), np.int64(group_begin), np.int32(tiling.splits),
            save_mean.buf, save_invstd.buf, None if save_offset is None else save_offset.buf, accs(eps),
            None if running_mean is None else running_mean.buf, None if running_var is None else running_var.buf,
            nbt, np.float64(0.0 if cumulative else momentum), np.int32(cumulative),
            SCRATCH if tiling.splits > 1 else None, COUNTERS)
    per_block = COLUMN_LANES * tiling.vector if columns else 1  # partial (mean, m2) pairs per block
    workspace = tiling.grid[0] * (8 + 2 * per_block * itemsize(acc)) if tiling.splits > 1 else 0
    launch = KernelLaunch(source=source, kernel=kernel, grid=tiling.grid, block=tiling.block, args=args,
                          signature=declared_signature(source, kernel), workspace_bytes=workspace,
                          counter_words=tiling.slots + 1,
                          notes={"view": (a, c, l), "slots": tiling.slots, "splits": tiling.splits,
                                 "columns": columns,
                                 "busy_splits": min(tiling.splits, -(-a // COLUMN_ROWS) if columns else
                                                    -(-a * -(-l // tiling.vector) // tiling.block[0])),
                                 "vector": tiling.vector, "vectors_per_thread": tiling.vectors_per_thread})
    return (launch,)
