"""Zero-copy exchange between CuPy, CUDA torch tensors and other DLPack producers.

The GPU path computes on CuPy arrays and launches on the current CuPy stream. For a torch input,
:func:`input_stream` makes torch's current stream (on the tensor's device) CuPy's current stream,
so the kernels run in order with the caller's torch work, and nothing synchronizes the host.
torch tensors cross into CuPy through DLPack (no copy); bfloat16 tensors, which CuPy cannot
represent, cross as int16 views of the same memory, and the kernel gets their raw pointer.
Outputs are allocated in the input's framework (torch's caching allocator for torch input) and
returned there.

CuPy and torch are imported lazily: importing cupybn must work without either.
"""
from __future__ import annotations

import contextlib
import sys

# DLPack device types (dlpack.h): CUDA and CUDA managed memory are the GPU path's.
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _is_cupy(x) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


is_cupy = _is_cupy


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_gpu_array(x) -> bool:
    """True for a CuPy array, a CUDA torch tensor, or a DLPack producer on a CUDA device.

    Cheap: imports nothing (a CuPy array or torch tensor implies its module is loaded).
    """
    if _is_cupy(x):
        return True
    if _is_torch(x):
        return bool(x.is_cuda)
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) in (_DL_CUDA, _DL_CUDA_MANAGED)
    except Exception:
        return False


def framework(x) -> str:
    """``"cupy"``, ``"torch"`` or ``"dlpack"`` (any other CUDA DLPack producer)."""
    if _is_cupy(x):
        return "cupy"
    if _is_torch(x):
        return "torch"
    return "dlpack"


def device_id(x) -> int:
    """The CUDA device ordinal of a GPU array."""
    if _is_cupy(x):
        return int(x.device.id)
    if _is_torch(x):
        return int(x.device.index if x.device.index is not None else 0)
    return int(x.__dlpack_device__()[1])


def _torch_dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


@contextlib.contextmanager
def input_stream(input):
    """Make ``input``'s device current, and for a torch tensor torch's current stream CuPy's.

    A CuPy input keeps the caller's current CuPy stream. No synchronization happens here.
    """
    import cupy

    with cupy.cuda.Device(device_id(input)):
        if _is_torch(input):
            import torch

            ts = torch.cuda.current_stream(input.device)
            if hasattr(cupy.cuda.Stream, "from_external") and hasattr(ts, "__cuda_stream__"):
                stream = cupy.cuda.Stream.from_external(ts)
            else:  # CuPy < 14
                stream = cupy.cuda.ExternalStream(ts.cuda_stream, device_id(input))
            with stream:
                yield
        else:
            yield


def stream_scope(input):
    """``scope(x)``: :func:`input_stream` for inputs like ``input``, decided once. For CuPy input
    the device of the signature is made current (a reused ``cupy.cuda.Device``); torch input
    takes torch's current stream per call."""
    if _is_torch(input) or not _is_cupy(input):
        return input_stream
    import cupy

    device = cupy.cuda.Device(device_id(input))
    return lambda x: device


def as_cupy(a, name: str = "input"):
    """``(cupy.ndarray, logical dtype name)`` sharing memory with ``a``; ``(None, None)`` for None.

    Call inside :func:`input_stream`: DLPack then hands the data over on the launch stream.
    """
    if a is None:
        return None, None
    import cupy

    if _is_cupy(a):
        return a, str(a.dtype)
    if _is_torch(a):
        import torch

        if not a.is_cuda:
            raise TypeError(f"{name} is a CPU torch tensor; the GPU path needs it on the input's CUDA device")
        a = a.detach()
        dtype = _torch_dtype_name(a)
        if dtype == "bfloat16":  # CuPy has no bfloat16: hand over the bits as int16
            return cupy.from_dlpack(a.view(torch.int16)), dtype
        return cupy.from_dlpack(a), dtype
    if not is_gpu_array(a):
        raise TypeError(f"{name} must live on the input's CUDA device, got {type(a).__name__}")
    try:
        arr = cupy.from_dlpack(a)
    except Exception as exc:  # e.g. a bfloat16 producer other than torch
        raise TypeError(f"{name}: CuPy cannot import this {type(a).__name__} through DLPack ({exc}); "
                        "pass a CuPy array or a torch tensor") from exc
    return arr, str(arr.dtype)


def contiguous(x):
    """A CuPy array: ``x`` itself when C-contiguous, else a contiguous copy made on the current stream."""
    import cupy

    return cupy.ascontiguousarray(x)


def empty_output(input, x_cupy, dtype: str):
    """A new contiguous output shaped like ``x_cupy``: ``(native array, cupy view of it)``.

    torch input -> a torch tensor from torch's caching allocator (same device, dtype); anything
    else -> a CuPy array. Returned to the caller in the input's framework by :func:`to_native`.
    """
    import cupy

    if _is_torch(input):
        import torch

        out = torch.empty(tuple(x_cupy.shape), dtype=input.dtype, device=input.device)
        return out, as_cupy(out)[0]
    storage = "int16" if dtype == "bfloat16" else dtype
    out = cupy.empty(x_cupy.shape, dtype=storage)
    return out, out


def output_allocator(input, dtype: str):
    """``alloc(shape) -> (native array, cupy view)``: :func:`empty_output` for inputs like
    ``input``, with the framework decided once (a prepared call's output)."""
    import cupy

    if _is_torch(input):
        import torch

        torch_dtype, device = input.dtype, input.device

        def alloc_torch(shape):
            out = torch.empty(shape, dtype=torch_dtype, device=device)
            return out, as_cupy(out)[0]
        return alloc_torch
    import numpy

    storage = numpy.dtype("int16" if dtype == "bfloat16" else dtype)
    empty = cupy.empty

    def alloc(shape):
        out = empty(shape, dtype=storage)
        return out, out
    return alloc


def to_native(input, native):
    """The output in the input's framework: torch and CuPy as allocated; another producer's own
    ``from_dlpack`` when its namespace has one (zero-copy), else the CuPy array."""
    if framework(input) != "dlpack":
        return native
    ns = getattr(input, "__array_namespace__", None)
    if ns is not None:
        try:
            return ns().from_dlpack(native)
        except Exception:
            pass
    return native


def promote(dtypes) -> str:
    """The one dtype mixed parameter dtypes are converted to: the common one, else the widest
    (float64 if any, else float32: float16 and bfloat16 only meet exactly in float32)."""
    present = {d for d in dtypes if d is not None}
    if len(present) == 1:
        return present.pop()
    return "float64" if "float64" in present else "float32"


def cast(a, dtype_from: str, dtype_to: str):
    """Convert a CuPy parameter vector between logical dtypes (exact: only ever widens here)."""
    if a is None or dtype_from == dtype_to:
        return a
    import cupy

    if dtype_from == "bfloat16":
        a = (a.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
    if dtype_to == "bfloat16":
        raise ValueError("parameters are never narrowed to bfloat16")
    return a.astype(dtype_to)
