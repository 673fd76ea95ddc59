"""Argument checks shared by the functional API and the layers.

Every check runs before any state is touched, so a failed call leaves running statistics exactly
as they were. Messages name the argument and what was expected; where PyTorch has a wording for
the same mistake, the message uses it.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np

from . import _dispatch

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_NAMES: dict = {}  # (type(dtype), dtype) -> name, see dtype_name


def dtype_name(dtype) -> str:
    """``"float32"``, ``"int64"``, ... for a NumPy, torch, CuPy or array-api-strict dtype."""
    # Keyed by (type, dtype): a lookup then never compares dtypes of two frameworks (array-api-strict
    # warns when its dtypes are compared with NumPy's), and NumPy's str(dtype) is slow Python.
    try:
        key = (type(dtype), dtype)
        return _NAMES[key]
    except TypeError:  # unhashable: not cached
        return _dtype_name(dtype)
    except KeyError:
        name = _NAMES[key] = _dtype_name(dtype)
        return name


def _dtype_name(dtype) -> str:
    text = str(dtype)
    if text.startswith("dtype("):  # NumPy's repr of a dtype object
        text = text[len("dtype("):]
    return text.strip("'\"<>()").split(" ")[-1].split(".")[-1]


def is_floating(x) -> bool:
    """True when ``x`` holds real floating-point numbers (f16, bf16, f32, f64)."""
    return dtype_name(x.dtype) in _FLOAT_NAMES


def check_floating(x, name: str) -> None:
    """TypeError unless ``x`` is a floating-point array."""
    if not _dispatch.is_array(x):
        raise TypeError(f"{name} must be an array (NumPy, CuPy, torch or a DLPack producer), "
                        f"got {type(x).__name__}")
    if not is_floating(x):
        raise TypeError(f"{name} must be a floating-point array (float16, bfloat16, float32 or "
                        f"float64), got dtype {dtype_name(x.dtype)}")


def check_vector(a, name: str, size: int, input) -> None:
    """``a`` is None or a floating 1-d array of ``size`` entries on the same device as ``input``."""
    if a is None:
        return
    check_floating(a, name)
    shape = tuple(a.shape)
    if shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) to match the input's {size} channels, "
                         f"got shape {shape}")
    check_same_device(input, a, name)


def check_same_device(input, a, name: str) -> None:
    """ValueError when ``a`` lives on another device than ``input`` (as PyTorch refuses)."""
    di, da = _dispatch.device_name(input), _dispatch.device_name(a)
    if di != da:
        raise ValueError(f"Expected all arrays to be on the same device, but input is on {di} and "
                         f"{name} is on {da}")


def _type_name(value) -> str:
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__name__}"


def check_real(value, name: str) -> float:
    """``value`` as a float: a Python or NumPy real number (bool included, as torch takes it) or a
    0-d real array; anything else (a string, None, a 1-element array, complex) is a TypeError."""
    t = type(value)
    if t is float or t is int:  # the usual case: one type test, nothing else
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and _dispatch.is_array(value) and \
            dtype_name(value.dtype).startswith(("float", "int", "uint", "bfloat")):
        return float(value)
    raise TypeError(f"{name} must be float, not {_type_name(value)}")


def check_bool(value, name: str) -> bool:
    """``value`` as a bool: ``True``/``False`` or a NumPy bool; not an int, a string or None (torch's
    ``argument 'training' must be bool``)."""
    if value is True or value is False:
        return value
    if type(value) is np.bool_:
        return bool(value)
    raise TypeError(f"{name} must be bool, not {_type_name(value)}")


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: a Python or NumPy integer or a 0-d integer array; not a
    bool, a float or a string (TypeError), and not below ``minimum`` (ValueError)."""
    if type(value) is not int:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be int, not bool")
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be int, not {_type_name(value)}") from None
    if value < minimum:
        what = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{name} must be a {what} integer, got {value}")
    return value


def check_eps(eps, allow_negative: bool = False) -> float:
    """``eps`` as a float; negative values are refused for batch and instance norm."""
    value = check_real(eps, "eps")
    if not allow_negative and not value >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    return value


def check_momentum(momentum, allow_none: bool) -> float | None:
    """``momentum`` as a float (or None where a cumulative average is meaningful); a string, None
    elsewhere or an array of several values is a TypeError."""
    if momentum is None:
        if allow_none:
            return None
        raise TypeError("momentum must be a float; momentum=None (cumulative average) needs "
                        "num_batches_tracked: use a layer or cupybn.RunningStats")
    return check_real(momentum, "momentum")


def check_writable(a, name: str) -> None:
    """ValueError unless ``a`` can be updated in place, as running statistics are.

    Read-only: a NumPy array with ``flags.writeable=False`` (a view of a read-only array, a
    broadcast), a torch tensor that requires grad (or a view of one: torch's batch norm refuses
    running statistics that require grad), and an inference tensor outside
    ``torch.inference_mode()``. CuPy arrays are always writable.
    """
    if type(a) is np.ndarray:  # the usual case
        if not a.flags.writeable:
            raise ValueError(f"{name} is read-only (a NumPy array with flags.writeable=False); "
                             f"running statistics are updated in place: pass a writable array")
        return
    if getattr(a, "requires_grad", False):
        raise ValueError(f"{name} requires grad; running statistics are updated in place and are "
                         f"not differentiable: pass a tensor that does not require grad")
    base = getattr(a, "_base", None)
    if base is not None and base.requires_grad:
        raise ValueError(f"{name} is a view of a tensor that requires grad and cannot be updated in "
                         f"place: pass a tensor that does not require grad")
    is_inference = getattr(a, "is_inference", None)
    if is_inference is not None and is_inference():
        import torch

        if not torch.is_inference_mode_enabled():
            raise ValueError(f"{name} is an inference tensor (created under torch.inference_mode()), "
                             f"read-only outside inference mode: pass {name}.clone()")
    flags = getattr(a, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"{name} is read-only (flags.writeable=False); running statistics are "
                         f"updated in place: pass a writable array")


def check_more_than_one_value(values_per_channel: int, shape, spatial: bool = False) -> None:
    """PyTorch's "Expected more than 1 value per channel when training" check."""
    if values_per_channel == 1:
        what = "spatial element" if spatial else "value per channel"
        raise ValueError(f"Expected more than 1 {what} when training, got input size {tuple(shape)}")
