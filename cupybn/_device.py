"""Devices and dtypes for the state that layers and RunningStats own.

State lives in NumPy on the CPU (``device=None`` or ``"cpu"``) and in CuPy on a GPU
(``"cuda"`` / ``"cuda:N"``). Inputs from other frameworks (torch, array-api-strict) read that
state zero-copy through DLPack, so one layer serves NumPy, torch and CuPy callers alike.
"""
from __future__ import annotations

import contextlib

import numpy as np


def parse_device(device) -> tuple[str, int | None]:
    """``("cpu", None)`` or ``("cuda", index)`` from None, a string or a torch/CuPy device."""
    if device is None:
        return "cpu", None
    if hasattr(device, "id") and not isinstance(device, str):  # cupy.cuda.Device
        return "cuda", int(device.id)
    text = str(device)
    if text == "cpu":
        return "cpu", None
    if text == "cuda":
        return "cuda", None
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def namespace_for(device):
    """NumPy for the CPU, CuPy for a CUDA device (imported only then)."""
    kind, _ = parse_device(device)
    if kind == "cpu":
        return np
    try:
        import cupy
    except ImportError:
        raise RuntimeError(f"device={device!r} needs CuPy: pip install 'cupybn[cuda13]'") from None
    return cupy


def on(device):
    """Context manager that makes ``device`` current for CuPy allocations (no-op on the CPU)."""
    kind, index = parse_device(device)
    if kind == "cpu" or index is None:
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(index)


def parse_dtype(dtype):
    """A NumPy dtype from None (float32), a NumPy/CuPy dtype, a torch dtype or a name."""
    if dtype is None:
        return np.dtype(np.float32)
    if str(dtype).startswith("torch."):
        dtype = str(dtype)[len("torch."):]
    if str(dtype) == "bfloat16":
        raise TypeError("dtype bfloat16 is not supported for parameters and running statistics "
                        "(NumPy and CuPy have no bfloat16); keep them in float32 — bfloat16 inputs work")
    try:
        result = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating dtype (NumPy, torch or a name), got {dtype!r}") from None
    if result.kind != "f":
        raise TypeError(f"dtype must be a floating dtype, got {result}")
    return result


def move(a, device):
    """``a`` (NumPy or CuPy) copied to ``device``; returned as is when it is already there."""
    kind, index = parse_device(device)
    xp = namespace_for(device)
    if kind == "cpu":
        if isinstance(a, np.ndarray):
            return a
        return a.get()
    with on(device):
        if isinstance(a, xp.ndarray) and (index is None or a.device.id == index):
            return a
        return xp.asarray(a)


def copy_into_state(value, like):
    """A fresh copy of ``value`` (NumPy, CuPy, torch, ...) with ``like``'s framework, device and dtype."""
    from . import _dispatch

    xp = _dispatch.namespace(like)
    if _dispatch.device_name(value) == _dispatch.device_name(like):
        src = _dispatch.convert_like(value, like)
    elif hasattr(value, "get"):  # CuPy -> host
        src = value.get()
    else:  # host -> GPU state, or torch CUDA -> host through its own copy
        src = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
    out = xp.empty(tuple(like.shape), dtype=like.dtype)
    out[...] = xp.asarray(src, dtype=like.dtype)
    return out
