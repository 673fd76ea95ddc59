"""Where an array's work runs, and moving small arrays between frameworks without copies.

Every public entry point asks this module two questions about its ``input``:

* :func:`route` — ``"cpu"`` (the array-API reference path, run in the input's own framework)
  or ``"gpu"`` (the hand-written CUDA kernels);
* :func:`namespace` — the array-API namespace of a CPU input (NumPy, torch, array-api-strict,
  or anything else ``array_api_compat`` knows).

Objects that only speak DLPack (``__dlpack__`` / ``__dlpack_device__``) are imported zero-copy
by :func:`as_known_array`: CPU ones become NumPy arrays, CUDA ones CuPy arrays.

The math never branches on the framework: it calls ``xp.<function>`` on the namespace chosen here.
"""
from __future__ import annotations

import math

import array_api_compat
import numpy

# DLPack device types (dlpack.h, DLDeviceType).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_GPU_DEVICE_TYPES = (_DL_CUDA, _DL_CUDA_MANAGED)


def is_array(x) -> bool:
    """True for anything cupybn accepts as an array: an array-API array or a DLPack producer."""
    return array_api_compat.is_array_api_obj(x) or hasattr(x, "__dlpack_device__")


def _dlpack_device(x):
    dev = x.__dlpack_device__()
    return int(dev[0]), int(dev[1])


def route(x) -> str:
    """``"gpu"`` for CuPy arrays and CUDA tensors (anything whose DLPack device is CUDA), else ``"cpu"``."""
    if array_api_compat.is_cupy_array(x):
        return "gpu"
    if array_api_compat.is_torch_array(x):
        return "gpu" if x.is_cuda else "cpu"
    if array_api_compat.is_numpy_array(x):
        return "cpu"
    if hasattr(x, "__dlpack_device__"):
        return "gpu" if _dlpack_device(x)[0] in _GPU_DEVICE_TYPES else "cpu"
    return "cpu"


def as_known_array(x):
    """Return ``x`` if ``array_api_compat`` knows its framework, else import it zero-copy by DLPack.

    CPU producers become NumPy arrays and CUDA producers CuPy arrays (the result shares memory
    with ``x``); results computed from them come back in NumPy / CuPy. torch tensors that
    require grad are detached: the functional API is not differentiable.
    """
    if array_api_compat.is_torch_array(x):
        return detached(x)
    if array_api_compat.is_array_api_obj(x):
        try:
            namespace(x)  # cached by type
            return x
        except TypeError:
            pass
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"expected an array (NumPy, CuPy, torch or a DLPack producer), got {type(x).__name__}")
    if _dlpack_device(x)[0] in _GPU_DEVICE_TYPES:
        import cupy

        return cupy.from_dlpack(x)
    import numpy

    return numpy.from_dlpack(x)


def detached(a):
    """``a`` without autograd history (torch tensors); other arrays unchanged.

    The reference math writes into arrays it allocates (``out=``, in-place operators), which
    autograd refuses for inputs that require grad; differentiation is :mod:`cupybn.torch`'s job.
    """
    return a.detach() if array_api_compat.is_torch_array(a) else a


_NAMESPACE_BY_TYPE: dict = {}


def namespace(*arrays):
    """The array-API namespace shared by ``arrays`` (``None`` entries are skipped).

    For one array the answer depends only on its type, and it is asked for many times per call on
    the hot path, so it is cached by type.
    """
    if len(arrays) == 1 and arrays[0] is not None:
        kind = type(arrays[0])
        xp = _NAMESPACE_BY_TYPE.get(kind)
        if xp is None:
            xp = _NAMESPACE_BY_TYPE[kind] = array_api_compat.array_namespace(arrays[0])
        return xp
    return array_api_compat.array_namespace(*(a for a in arrays if a is not None))


# Array types that only ever live in host memory (filled as they are met): device_name's fast path.
_HOST_TYPES: set = set()


def is_host_type(x) -> bool:
    """True when ``x``'s type only ever lives in host memory and has no autograd (NumPy,
    array-api-strict), as far as seen so far: a fast path for checks that such arrays pass."""
    return type(x) in _HOST_TYPES


def device_name(x) -> str:
    """``"cpu"`` or ``"cuda:N"``: where ``x`` lives, in PyTorch's spelling."""
    if type(x) in _HOST_TYPES:
        return "cpu"
    if array_api_compat.is_numpy_array(x) or type(x).__module__.startswith("array_api_strict"):
        _HOST_TYPES.add(type(x))
        return "cpu"
    if array_api_compat.is_cupy_array(x):
        return f"cuda:{x.device.id}"
    if array_api_compat.is_torch_array(x):
        return str(x.device) if x.is_cuda else "cpu"
    if hasattr(x, "__dlpack_device__"):
        kind, index = _dlpack_device(x)
        return f"cuda:{index}" if kind in _GPU_DEVICE_TYPES else "cpu"
    return "cpu"


def same_framework(a, b) -> bool:
    """True when ``a`` and ``b`` belong to the same array framework."""
    return type(a) is type(b) or namespace(a) is namespace(b)


def convert_like(a, like):
    """``a`` as an array of ``like``'s framework, sharing memory (DLPack) — for per-channel vectors.

    Both must be on the same device; ``a`` is returned unchanged when the frameworks already match.
    """
    if a is None or same_framework(a, like):
        return a
    xp = namespace(like)
    a = detached(a)
    try:
        return xp.from_dlpack(a)
    except (BufferError, TypeError, RuntimeError):
        # A read-only NumPy array refuses DLPack export; a copy of a parameter vector is harmless.
        import numpy

        return xp.asarray(numpy.array(a, copy=True))


def quiet_floating_point():
    """Silence NumPy's floating-point warnings (NaN/Inf inputs, eps=0): torch does not warn either."""
    import numpy

    return numpy.errstate(divide="ignore", invalid="ignore", over="ignore")


def binary_into(op, a, b, out) -> None:
    """``out[...] = op(a, b)`` with no temporary where the framework takes ``out=`` (NumPy, torch).

    ``op`` is an elementwise namespace function such as ``xp.multiply``; frameworks without
    ``out=`` (array-api-strict) get the plain assignment.
    """
    try:
        op(a, b, out=out)
    except TypeError:
        out[...] = op(a, b)


# Cache-line size: stores that straddle two lines run ~30% slower in NumPy's SIMD loops.
_ALIGNMENT = 64


def empty_aligned(xp, shape, dtype, like, reusable: bool = False):
    """``xp.empty(shape)`` on ``like``'s device, its data starting on a 64-byte boundary.

    NumPy takes large arrays from ``malloc``, whose blocks start 16 bytes past a page boundary, so
    every SIMD store of a loop that writes one would straddle two cache lines: for NumPy a
    slightly larger buffer is sliced to the boundary. Other frameworks (torch aligns its own)
    get ``xp.empty`` as it is. ``reusable`` (scratch kept across calls): for torch never an
    inference tensor, even when made under ``torch.inference_mode()``, since later calls outside
    it write into it again, which torch refuses for one.
    """
    if not isinstance(like, numpy.ndarray):
        if reusable and array_api_compat.is_torch_array(like):
            import torch

            with torch.inference_mode(False):
                return xp.empty(shape, dtype=dtype, device=array_api_compat.device(like))
        return xp.empty(shape, dtype=dtype, device=array_api_compat.device(like))
    # (NumPy's own calls: this runs between the passes over the data, where every Python call
    # is slow with the caches full of data)
    size = math.prod(shape)
    buf = numpy.empty(size + _ALIGNMENT, dtype=dtype)
    start = (-buf.__array_interface__["data"][0] % _ALIGNMENT) // buf.itemsize
    return buf[start:start + size].reshape(shape)


def sum_with_ones(xp, d, ones, axis: int):
    """``xp.sum(d, axis=axis)`` for ``axis`` -1 or -2; ``ones`` is a vector of ones of that length.

    NumPy gets a matrix-vector product with ``ones``: OpenBLAS, several times faster than
    ``numpy.sum`` over these axes, and as accurate up to 256K float32 elements per sum (its kernels
    carry many partial sums: relative error ~1e-8, measured). torch's CPU matrix-vector products
    accumulate in long float32 runs (8e-7 at 256K elements; the batched form, 7e-5), so every
    other framework gets its own ``sum`` (torch's is a cascade sum: 5e-8).
    """
    if type(d) is numpy.ndarray:  # exact type test: asked once per cache-sized piece
        return d @ ones if axis == -1 else ones @ d
    return xp.sum(d, axis=axis)


def sum_of_squares(xp, d):
    """``sum(d * d)`` over the last axis, as accurately as the framework's best reduction.

    ``xp.vecdot``, except for torch, whose array-api-compat ``vecdot`` is a batched matrix product
    with float32 runs as long as the axis (relative error 2e-5 at 256K elements, 1e-3 at 4M):
    ``torch.linalg.vecdot`` multiplies and then cascade-sums (5e-8).
    """
    if type(d) is not numpy.ndarray and array_api_compat.is_torch_array(d):
        import torch

        return torch.linalg.vecdot(d, d, dim=-1)
    return xp.vecdot(d, d, axis=-1)


def column_sums_of_squares(x2):
    """``sum(x2 * x2, axis=0)`` of a 2-D array without a squared temporary, or None.

    NumPy's ``einsum("ij,ij->j")`` reads ``x2`` once and writes nothing; squaring into a buffer
    first costs a write and a second read, a third of batch norm's statistics on ``(N, C)``
    inputs. Other frameworks get None (their ``einsum`` or ``vecdot`` over axis 0 is slower than
    the square-then-sum the caller falls back to).
    """
    # An exact type test: it runs once per cache-sized piece, where array_api_compat's
    # is_numpy_array would take several Python calls (each slow with the caches full of data).
    if type(x2) is not numpy.ndarray:
        return None
    return numpy.einsum("ij,ij->j", x2, x2)
