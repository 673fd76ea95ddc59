"""Argument checks shared by the functional API and the layers.

Every check runs before any state is touched, so a failed call leaves running statistics exactly
as they were. Messages name the argument and what was expected; where PyTorch has a wording for
the same mistake, the message uses it.
"""
from __future__ import annotations

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


def check_eps(eps, allow_negative: bool = False) -> float:
    """``eps`` as a float; negative values are refused for batch and instance norm."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}") from None
    if not allow_negative and not value >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    return value


def check_momentum(momentum, allow_none: bool) -> float | None:
    """``momentum`` as a float in [0, 1] (or None where a cumulative average is meaningful)."""
    if momentum is None:
        if allow_none:
            return None
        raise TypeError("momentum must be a float; momentum=None (cumulative average) needs "
                        "num_batches_tracked: use a layer or cupybn.RunningStats")
    try:
        value = float(momentum)
    except (TypeError, ValueError):
        raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__}") from None
    return value


def check_more_than_one_value(values_per_channel: int, shape, spatial: bool = False) -> None:
    """PyTorch's "Expected more than 1 value per channel when training" check."""
    if values_per_channel == 1:
        what = "spatial element" if spatial else "value per channel"
        raise ValueError(f"Expected more than 1 {what} when training, got input size {tuple(shape)}")
