"""The launch planner: (op, shapes, strides, dtypes) -> kernel name, grid, block, smem, workspace, args.

One planner drives both launchers (CuPy's ``RawModule`` on a GPU, the CPU emulator in the
tests), so what the emulator proves about a plan holds for the plan that runs on the GPU.

The planner never touches memory. Arrays enter as :class:`Operand`: a buffer the launcher passes
as a pointer (a CuPy array, an emulator-allocated NumPy array, or ``None`` for a null pointer)
plus its shape, element strides and *logical* dtype name. bfloat16 buffers are 16-bit integer
arrays (neither NumPy nor CuPy has bf16), so the logical dtype travels next to the buffer.

The one list of kernel instantiations
-------------------------------------
:data:`INSTANTIATIONS` holds every ``(source file, C++ name expression)`` the planner can emit.
The NVRTC compile gate compiles exactly this list, the emulator launcher builds it, and
:func:`_instantiation` refuses to plan a kernel that is not in it, so nothing escapes the gate.

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

A BatchNorm training forward is two launches: statistics with the running-stat update fused in
(:func:`plan_moments`), then the normalize (:func:`normalize_tiling`); x is read twice, y written
once.

BatchNorm backward (:func:`plan_batch_norm_backward`, kernels/batch_norm_backward.cu) is at most
two launches: a per-channel reduction of ``sum(dy)`` and ``sum(dy * (x - mean))`` on
``moments_tiling``'s split (blocks per channel, fixed-order last-block combine, self-resetting
counters) that also writes ``grad_weight`` / ``grad_bias``, then the elementwise ``dx`` on
``normalize_tiling``. Training: dy and x read twice, dx written once; eval ``dx`` alone: one
launch reading dy once. The kernels are instantiated per ``(x, stats, parameter)`` dtype triple of
:func:`backward_stats_params`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------ dtypes

# logical dtype name -> (C++ type, itemsize, storage dtype of a host/NumPy/CuPy buffer, code)
# `code` is the emulator's pointer code ("p:<code>") and scalar code for this type.
_DTYPES = {
    "float16": ("__half", 2, np.dtype(np.float16), "f16"),
    "bfloat16": ("__nv_bfloat16", 2, np.dtype(np.uint16), "bf16"),
    "float32": ("float", 4, np.dtype(np.float32), "f32"),
    "float64": ("double", 8, np.dtype(np.float64), "f64"),
}
FLOAT_DTYPES = tuple(_DTYPES)

# Storage dtypes a bf16 buffer may have: NumPy/emulator use uint16; a torch bf16 tensor seen
# through DLPack as int16 (``tensor.view(torch.int16)``) carries the same bits.
_BF16_STORAGE = (np.dtype(np.uint16), np.dtype(np.int16))

# Scalar parameter codes -> the NumPy scalar type that marshals to exactly that C type.
SCALAR_TYPES = {
    "i32": np.int32,
    "i64": np.int64,
    "u32": np.uint32,
    "u64": np.uint64,
    "f32": np.float32,
    "f64": np.float64,
}


def cxx_type(dtype: str) -> str:
    """The C++ spelling of a logical dtype name (``"bfloat16"`` -> ``"__nv_bfloat16"``)."""
    return _DTYPES[dtype][0]


def itemsize(dtype: str) -> int:
    """Bytes per element of a logical dtype."""
    return _DTYPES[dtype][1]


def storage_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a buffer that holds ``dtype`` elements (uint16 for bfloat16)."""
    return _DTYPES[dtype][2]


def type_code(dtype: str) -> str:
    """The emulator's type code of a logical dtype (``"f16"``, ``"bf16"``, ``"f32"``, ``"f64"``)."""
    return _DTYPES[dtype][3]


def accumulation_dtype(dtype: str) -> str:
    """float64 for float64 data, float32 otherwise (the CPU path's rule)."""
    return "float64" if dtype == "float64" else "float32"


def vector_width(dtype: str) -> int:
    """Elements per 16-byte vector."""
    return 16 // itemsize(dtype)


# ------------------------------------------------------------------------------------ the one list

_NORMALIZE = "cupybn::batch_norm_normalize<{T}, {S}, {P}, cupybn::{kind}>"
_NORMALIZE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "p:{S}", "p:{S}", "p:{P}", "p:{P}", "{A}",
                        "p:{S}")


def _normalize_expression(x: str, stats: str, params: str, kind: str) -> str:
    return _NORMALIZE.format(T=cxx_type(x), S=cxx_type(stats), P=cxx_type(params), kind=kind)


def _normalize_signature(x: str, stats: str, params: str) -> tuple[str, ...]:
    codes = dict(T=type_code(x), S=type_code(stats), P=type_code(params), A=type_code(accumulation_dtype(x)))
    return tuple(c.format(**codes) for c in _NORMALIZE_SIGNATURE)


_MOMENTS = "cupybn::moments_forward<{T}, {R}>"
_MOMENTS_COLUMNS = "cupybn::moments_columns<{T}, {R}>"
_MOMENTS_SIGNATURE = ("p:{T}", "i64", "i64", "i64", "i64", "i32", "p:{A}", "p:{A}", "p:{A}", "{A}",
                      "p:{R}", "p:{R}", "p:i64", "f64", "i32", "p:void", "p:u32")


def _moments_expression(x: str, running: str, columns: bool = False) -> str:
    return (_MOMENTS_COLUMNS if columns else _MOMENTS).format(T=cxx_type(x), R=cxx_type(running))


def _moments_signature(x: str, running: str) -> tuple[str, ...]:
    codes = dict(T=type_code(x), R=type_code(running), A=type_code(accumulation_dtype(x)))
    return tuple(c.format(**codes) for c in _MOMENTS_SIGNATURE)


def _build_instantiations():
    table = {}
    # BatchNorm eval forward: x of any float dtype, running stats and affine parameters of any
    # (one) float dtype -- same as x, wider (mixed precision) or narrower (f64 x, f32 layer).
    for x in FLOAT_DTYPES:
        for p in FLOAT_DTYPES:
            table[("batch_norm.cu", _normalize_expression(x, p, p, "kRunningVar"))] = _normalize_signature(x, p, p)
    # Training forward, normalize step: statistics saved in the accumulation dtype (kInvStd),
    # affine parameters of any float dtype.
    for x in FLOAT_DTYPES:
        a = accumulation_dtype(x)
        for p in FLOAT_DTYPES:
            table[("batch_norm.cu", _normalize_expression(x, a, p, "kInvStd"))] = _normalize_signature(x, a, p)
    # Statistics step (moments.cu): x of any float dtype, running statistics of any float dtype
    # (without running statistics the planner picks R = the accumulation dtype).
    for x in FLOAT_DTYPES:
        for r in FLOAT_DTYPES:
            table[("moments.cu", _moments_expression(x, r))] = _moments_signature(x, r)
            table[("moments.cu", _moments_expression(x, r, columns=True))] = _moments_signature(x, r)
    return table


# (source, name expression) -> parameter type codes the planner passes (checked against the
# compiled kernel by the emulator tests). Add here, and only here, to emit a new kernel.
_SIGNATURES: dict[tuple[str, str], tuple[str, ...]] = _build_instantiations()

#: Every kernel instantiation the planner can emit, as ``(source file, name expression)``.
INSTANTIATIONS: tuple[tuple[str, str], ...] = tuple(_SIGNATURES)


def instantiations_for(source: str) -> tuple[str, ...]:
    """Name expressions of :data:`INSTANTIATIONS` that live in ``source``."""
    return tuple(k for s, k in INSTANTIATIONS if s == source)


def declared_signature(source: str, kernel: str) -> tuple[str, ...]:
    """The parameter type codes the planner marshals for ``kernel`` (emulator notation)."""
    return _SIGNATURES[(source, kernel)]


def _instantiation(source: str, kernel: str) -> tuple[str, str]:
    if (source, kernel) not in _SIGNATURES:
        raise AssertionError(f"planner emitted {kernel} from {source}, which is not in INSTANTIATIONS "
                             "(the compile gate would never have checked it)")
    return source, kernel


# ------------------------------------------------------------------------------------ plan objects

@dataclass(frozen=True)
class Operand:
    """An array as the planner sees it: an opaque buffer plus shape, element strides, dtype name.

    ``buf`` is what the launcher passes for the pointer (never inspected here); ``strides`` are in
    elements; ``dtype`` is a logical name from :data:`FLOAT_DTYPES`.
    """

    buf: Any
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, array, dtype: str | None = None) -> "Operand":
        """Describe a NumPy or CuPy array (``dtype`` overrides the logical dtype, e.g. bfloat16)."""
        shape = tuple(int(s) for s in array.shape)
        size = array.dtype.itemsize
        strides = tuple(int(s) // size for s in array.strides)
        name = dtype if dtype is not None else str(array.dtype)
        if name not in _DTYPES and not (name == "int64" and dtype is None):  # int64: num_batches_tracked
            raise TypeError(f"unsupported dtype {name}; expected one of {', '.join(FLOAT_DTYPES)}")
        if dtype is not None:
            want = _BF16_STORAGE if name == "bfloat16" else (storage_dtype(name),)
            if np.dtype(array.dtype) not in want:
                raise TypeError(f"a {name} buffer must have storage dtype {' or '.join(map(str, want))}, "
                                f"got {array.dtype}")
        return cls(array, shape, strides, name)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        """C-contiguous (dimensions of extent 1 may have any stride; an empty array is contiguous)."""
        if 0 in self.shape:
            return True
        expected = 1
        for extent, stride in zip(reversed(self.shape), reversed(self.strides)):
            if extent != 1 and stride != expected:
                return False
            expected *= extent
        return True


@dataclass(frozen=True)
class DeviceInfo:
    """What the planner needs to know about the GPU. The default is an H100 (132 SMs)."""

    sm_count: int = 132
    max_threads_per_sm: int = 2048
    max_grid_x: int = 2**31 - 1
    max_grid_y: int = 65535


class WorkspaceRef:
    """A pointer argument the launcher fills in: ``SCRATCH`` (``workspace_bytes`` of uninitialized
    scratch memory, private to the launch) or ``COUNTERS`` (``counter_words`` unsigned ints that are
    zero on entry and that the kernel leaves zero on exit).

    Counters: the launcher allocates them zeroed once and caches them per (device, stream), growing
    (a new zeroed allocation) when a launch needs more; the kernels' protocol resets every counter
    they use before they exit, so no launch needs a memset and a CUDA graph that captured a launch
    replays it correctly. Scratch comes from the memory pool on the launch stream.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self) -> str:
        return f"planner.{self.kind.upper()}"


SCRATCH = WorkspaceRef("scratch")
COUNTERS = WorkspaceRef("counters")


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: what both launchers execute.

    ``args`` holds buffers (or ``None``) for pointer parameters and NumPy scalars of the exact C
    type for the others; ``signature`` is the planner's declaration of those types.
    ``workspace_bytes`` is scratch global memory the launch needs (passed where ``args`` holds
    :data:`SCRATCH`); ``counter_words`` the number of zero-on-entry, zero-on-exit ``unsigned int``
    counters (passed where ``args`` holds :data:`COUNTERS`); see :class:`WorkspaceRef`.
    """

    source: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple
    signature: tuple[str, ...]
    smem: int = 0
    workspace_bytes: int = 0
    notes: dict = field(default_factory=dict, compare=False)
    counter_words: int = 0

    def with_workspace(self, scratch, counters) -> "KernelLaunch":
        """This launch with :data:`SCRATCH` / :data:`COUNTERS` replaced by the given buffers."""
        args = tuple(scratch if a is SCRATCH else counters if a is COUNTERS else a for a in self.args)
        return KernelLaunch(self.source, self.kernel, self.grid, self.block, args, self.signature, self.smem,
                            self.workspace_bytes, self.notes, self.counter_words)


# ------------------------------------------------------------------------------------ argument checks

def check_args(kernel: str, signature, args) -> None:
    """Raise TypeError unless every argument marshals to exactly its kernel parameter's C type.

    CuPy marshals a Python ``int`` as a 64-bit integer and a ``float`` as a double, whatever the
    kernel declares, so a Python scalar for an ``int`` or ``float`` parameter silently passes
    garbage on the GPU. Scalars must therefore be NumPy scalars of the parameter's exact type
    (``numpy.int32`` for ``i32``, ``numpy.float32`` for ``f32``, ...). Pointer parameters take an
    array whose storage dtype matches the pointee (``uint16``/``int16`` for bf16) or ``None``.
    """
    signature = tuple(signature)
    if len(args) != len(signature):
        raise TypeError(f"{kernel} takes {len(signature)} arguments ({', '.join(signature)}), got {len(args)}")
    for i, (code, arg) in enumerate(zip(signature, args)):
        where = f"{kernel}: argument {i} ({code})"
        if code.startswith("p:"):
            if arg is None:
                continue
            if isinstance(arg, (bool, int, float, np.generic)):
                raise TypeError(f"{where}: pointer parameter got the scalar {arg!r}; pass an array or None")
            dtype = getattr(arg, "dtype", None)
            if dtype is None:
                raise TypeError(f"{where}: pointer parameter got {type(arg).__name__}; pass an array or None")
            pointee = code[2:]
            if isinstance(arg, WorkspaceRef):
                raise TypeError(f"{where}: {arg!r} was not replaced by a buffer (the launcher allocates it)")
            allowed = {"f16": (np.dtype(np.float16),), "bf16": _BF16_STORAGE, "f32": (np.dtype(np.float32),),
                       "f64": (np.dtype(np.float64),), "i64": (np.dtype(np.int64),),
                       "u32": (np.dtype(np.uint32),)}.get(pointee)
            if allowed is not None and np.dtype(dtype) not in allowed:
                raise TypeError(f"{where}: array of dtype {dtype} for a {pointee} pointer "
                                f"(expected {' or '.join(map(str, allowed))})")
            continue
        want = SCALAR_TYPES.get(code)
        if want is None:
            raise TypeError(f"{where}: parameter type {code!r} is not marshalled by cupybn")
        if isinstance(arg, (bool, int, float)) and not isinstance(arg, np.generic):
            cupy_type = "a 1-byte bool" if isinstance(arg, bool) else (
                "a 64-bit integer" if isinstance(arg, int) else "a double")
            raise TypeError(f"{where}: got the Python {type(arg).__name__} {arg!r}; CuPy would pass it as "
                            f"{cupy_type}, whatever the kernel's parameter is. "
                            f"Pass numpy.{np.dtype(want).name}({arg!r}).")
        if type(arg) is not want:
            raise TypeError(f"{where}: got {type(arg).__name__}, expected numpy.{np.dtype(want).name}")


# ------------------------------------------------------------------------------------ tiling

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


# ------------------------------------------------------------------------------------ plans

def _require_vector(name: str, op: Operand | None, channels: int, optional: bool) -> None:
    if op is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if op.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {op.shape}")
    if channels > 1 and op.strides[0] != 1:
        raise ValueError(f"{name} must be contiguous")


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


# ------------------------------------------------------------------------------------ statistics (moments.cu)

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


# ------------------------------------------------------------------------------------ layer / group / instance norm

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

_FUSED = "cupybn::fused_groups<{T}, {P}, {R}>"
_FUSED_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{P}", "p:{P}", "{A}", "i32", "i32",
                    "p:void", "p:void", "i32", "f64", "p:void", "p:u32")
_GROUP_NORMALIZE = "cupybn::normalize_groups<{T}, {P}>"
_GROUP_NORMALIZE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "p:{A}",
                              "p:{P}", "p:{P}")


def _codes(x: str, p: str) -> dict:
    return dict(T=type_code(x), P=type_code(p), A=type_code(accumulation_dtype(x)))


def _add_group_instantiations(table: dict) -> None:
    # x of any float dtype x affine parameters of any (one) float dtype; running statistics (instance
    # norm) of any float dtype are handled at run time (RunningType), not by instantiation.
    for x in FLOAT_DTYPES:
        for p in FLOAT_DTYPES:
            names = dict(T=cxx_type(x), P=cxx_type(p))
            # warp per group (registers; not for float64: ptxas calls its double-division slow
            # path with a stack frame there) / block per group
            for registers in ("true", "false") if x != "float64" else ("false",):
                table[("fused_groups.cu", _FUSED.format(R=registers, **names))] = tuple(
                    c.format(**_codes(x, p)) for c in _FUSED_SIGNATURE)
            table[("fused_groups.cu", _GROUP_NORMALIZE.format(**names))] = tuple(
                c.format(**_codes(x, p)) for c in _GROUP_NORMALIZE_SIGNATURE)


_add_group_instantiations(_SIGNATURES)


# ------------------------------------------------------------------------------------ batch norm backward

_BN_BACKWARD_REDUCE = "cupybn::batch_norm_backward_reduce<{T}, {S}, {P}>"
_BN_BACKWARD_REDUCE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i32", "p:{S}", "p:{S}", "i32", "{A}",
                                 "p:{A}", "p:{P}", "p:{P}", "p:void", "p:u32")
_BN_BACKWARD_DX = "cupybn::batch_norm_backward_dx<{T}, {S}, {P}>"
_BN_BACKWARD_DX_SIGNATURE = ("p:{T}", "p:{T}", "p:{T}", "i64", "i64", "i64", "p:{S}", "p:{S}", "i32", "p:{P}",
                             "{A}", "p:{A}", "{A}", "i32")


def backward_stats_params(x: str) -> tuple[tuple[str, str], ...]:
    """The ``(stats dtype, parameter dtype)`` pairs the BatchNorm backward kernels are instantiated
    for, given ``x``'s dtype: saved statistics in the accumulation dtype with a weight of any float
    dtype (training), and running statistics of the weight's dtype (eval). Other combinations are
    converted to ``(accumulation dtype, weight dtype)`` by the caller."""
    acc = accumulation_dtype(x)
    pairs = [(acc, p) for p in FLOAT_DTYPES] + [(p, p) for p in FLOAT_DTYPES if p != acc]
    return tuple(pairs)


def _add_backward_instantiations(table: dict) -> None:
    for x in FLOAT_DTYPES:
        for s, p in backward_stats_params(x):
            names = dict(T=cxx_type(x), S=cxx_type(s), P=cxx_type(p))
            codes = dict(T=type_code(x), S=type_code(s), P=type_code(p), A=type_code(accumulation_dtype(x)))
            table[("batch_norm_backward.cu", _BN_BACKWARD_REDUCE.format(**names))] = tuple(
                c.format(**codes) for c in _BN_BACKWARD_REDUCE_SIGNATURE)
            table[("batch_norm_backward.cu", _BN_BACKWARD_DX.format(**names))] = tuple(
                c.format(**codes) for c in _BN_BACKWARD_DX_SIGNATURE)


_add_backward_instantiations(_SIGNATURES)

# ------------------------------------------------------------------------------------ group norms backward

_GB_REDUCE = "cupybn::groups_backward_reduce<{T}, {P}>"
_GB_REDUCE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "p:{P}", "p:{A}")
_GB_DX = "cupybn::groups_backward_dx<{T}, {P}>"
_GB_DX_SIGNATURE = ("p:{T}", "p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "p:{P}", "p:{A}")
_GB_PARTIAL = "cupybn::groups_backward_param_partial<{T}>"
_GB_PARTIAL_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "i64", "p:{A}", "p:{A}", "i64", "p:{A}")
_GB_COMBINE = "cupybn::groups_backward_param_combine<{T}, {P}>"  # T: the accumulation type here
_GB_COMBINE_SIGNATURE = ("p:{A}", "i64", "i64", "p:{P}", "p:{P}")


def _add_groups_backward_instantiations(table: dict) -> None:
    src = "groups_backward.cu"
    for x in FLOAT_DTYPES:
        for p in FLOAT_DTYPES:
            names = dict(T=cxx_type(x), P=cxx_type(p))
            table[(src, _GB_REDUCE.format(**names))] = tuple(c.format(**_codes(x, p)) for c in _GB_REDUCE_SIGNATURE)
            table[(src, _GB_DX.format(**names))] = tuple(c.format(**_codes(x, p)) for c in _GB_DX_SIGNATURE)
        table[(src, _GB_PARTIAL.format(T=cxx_type(x)))] = tuple(
            c.format(**_codes(x, x)) for c in _GB_PARTIAL_SIGNATURE)
    for a in ("float32", "float64"):
        for p in FLOAT_DTYPES:
            table[(src, _GB_COMBINE.format(T=cxx_type(a), P=cxx_type(p)))] = tuple(
                c.format(**_codes(a, p)) for c in _GB_COMBINE_SIGNATURE)


_add_groups_backward_instantiations(_SIGNATURES)
INSTANTIATIONS = tuple(_SIGNATURES)


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
