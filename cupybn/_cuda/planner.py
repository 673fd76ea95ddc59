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

The same tiling serves the training normalize (issue 4, ``kInvStd``), and layer/group/instance
norm's normalize step later: all of them are "per-element affine from per-group statistics".
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
_NORMALIZE_SIGNATURE = ("p:{T}", "p:{T}", "i64", "i64", "i64", "p:{S}", "p:{S}", "p:{P}", "p:{P}", "{A}")


def _normalize_expression(x: str, stats: str, params: str, kind: str) -> str:
    return _NORMALIZE.format(T=cxx_type(x), S=cxx_type(stats), P=cxx_type(params), kind=kind)


def _normalize_signature(x: str, stats: str, params: str) -> tuple[str, ...]:
    codes = dict(T=type_code(x), S=type_code(stats), P=type_code(params), A=type_code(accumulation_dtype(x)))
    return tuple(c.format(**codes) for c in _NORMALIZE_SIGNATURE)


def _build_instantiations():
    table = {}
    # BatchNorm eval forward: x of any float dtype, running stats and affine parameters of any
    # (one) float dtype -- same as x, wider (mixed precision) or narrower (f64 x, f32 layer).
    for x in FLOAT_DTYPES:
        for p in FLOAT_DTYPES:
            table[("batch_norm.cu", _normalize_expression(x, p, p, "kRunningVar"))] = _normalize_signature(x, p, p)
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
        if name not in _DTYPES:
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
        """C-contiguous (dimensions of extent 1 may have any stride)."""
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


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: what both launchers execute.

    ``args`` holds buffers (or ``None``) for pointer parameters and NumPy scalars of the exact C
    type for the others; ``signature`` is the planner's declaration of those types.
    ``workspace_bytes`` is scratch global memory the launch needs (0 here; the training kernels of
    issue 4 will need partials and zeroed tickets).
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
            allowed = {"f16": (np.dtype(np.float16),), "bf16": _BF16_STORAGE, "f32": (np.dtype(np.float32),),
                       "f64": (np.dtype(np.float64),)}.get(pointee)
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


def plan_batch_norm_eval_forward(x: Operand, y: Operand, running_mean: Operand, running_var: Operand,
                                 weight: Operand | None, bias: Operand | None, eps: float,
                                 device: DeviceInfo = DeviceInfo()) -> tuple[KernelLaunch, ...]:
    """Launches of BatchNorm's eval forward: ``y = (x - mean) * (invstd * weight) + bias``.

    ``x`` and ``y``: contiguous ``(N, C, *spatial)`` of one float dtype. ``running_mean`` and
    ``running_var`` share one float dtype, ``weight`` and ``bias`` (each optional) that same dtype
    (the caller converts mixed parameter dtypes first). Returns one launch, or none for an empty
    input. The kernel folds ``invstd = 1 / sqrt(running_var + eps)`` itself: no host sync.
    """
    if len(x.shape) < 2:
        raise ValueError(f"batch norm needs an (N, C, ...) input, got shape {x.shape}")
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"output {y.shape} {y.dtype} does not match input {x.shape} {x.dtype}")
    if not x.is_contiguous() or not y.is_contiguous():
        raise ValueError("the normalize kernel needs contiguous input and output (strides "
                         f"{x.strides} / {y.strides} for shape {x.shape})")
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

    rows = x.shape[0]
    inner = math.prod(x.shape[2:])
    cols = channels * inner
    tiling = normalize_tiling(rows, cols, x.dtype, device)
    source, kernel = _instantiation("batch_norm.cu", _normalize_expression(x.dtype, stats, stats, "kRunningVar"))
    acc = SCALAR_TYPES[type_code(accumulation_dtype(x.dtype))]
    args = (x.buf, y.buf, np.int64(rows), np.int64(cols), np.int64(inner),
            running_mean.buf, running_var.buf,
            None if weight is None else weight.buf, None if bias is None else bias.buf,
            acc(eps))
    launch = KernelLaunch(source=source, kernel=kernel, grid=tiling.grid, block=tiling.block, args=args,
                          signature=declared_signature(source, kernel),
                          notes={"rows": rows, "cols": cols, "inner": inner, "vector": tiling.vector,
                                 "rows_per_thread": tiling.rows_per_thread})
    return (launch,)
