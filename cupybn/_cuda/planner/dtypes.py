"""Logical dtypes: the names the planner speaks (``"float16"``, ``"bfloat16"``, ``"float32"``,
``"float64"``), their C++ spelling, size, storage dtype, emulator type code, accumulation dtype
and vector width, and the NumPy scalar type of each scalar parameter code.

bfloat16 buffers are 16-bit integer arrays (neither NumPy nor CuPy has bf16), so the logical dtype
travels next to the buffer (see :class:`.launch.Operand`).
"""
from __future__ import annotations

import numpy as np

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
