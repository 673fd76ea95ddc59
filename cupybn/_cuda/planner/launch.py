"""What a plan is made of: :class:`Operand` (an array as the planner sees it), :class:`DeviceInfo`,
the workspace placeholders :data:`SCRATCH` / :data:`COUNTERS`, :class:`KernelLaunch` (what both
launchers execute) and :func:`check_args` (every argument marshals to its parameter's exact C type).

The planner never touches memory. Arrays enter as :class:`Operand`: a buffer the launcher passes
as a pointer (a CuPy array, an emulator-allocated NumPy array, or ``None`` for a null pointer)
plus its shape, element strides and *logical* dtype name. bfloat16 buffers are 16-bit integer
arrays (neither NumPy nor CuPy has bf16), so the logical dtype travels next to the buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dtypes import _BF16_STORAGE, _DTYPES, FLOAT_DTYPES, SCALAR_TYPES, storage_dtype

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


def _require_vector(name: str, op: Operand | None, channels: int, optional: bool) -> None:
    """``op`` is a contiguous ``(channels,)`` vector (or ``None`` where ``optional``)."""
    if op is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if op.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {op.shape}")
    if channels > 1 and op.strides[0] != 1:
        raise ValueError(f"{name} must be contiguous")
