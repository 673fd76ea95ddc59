"""Shared fixtures and helpers for the CPU test suite.

Backends: "numpy" (numpy.ndarray), "torch" (CPU torch.Tensor), "strict" (array_api_strict).
Dtypes: float16, bfloat16 (torch only), float32, float64 (array_api_strict has no float16).

Helpers are importable as ``from conftest import ...`` (pyproject puts tests/ on sys.path).
"""
from __future__ import annotations

import os
import secrets

import numpy as np
import pytest

try:
    import torch
except ImportError:  # pragma: no cover - torch is an optional dependency
    torch = None

try:
    import array_api_strict
except ImportError:  # pragma: no cover
    array_api_strict = None

BACKENDS = ["numpy", "torch", "strict"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]

# machine epsilon (spacing at 1.0) of each dtype
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}


def backend_supports(backend, dtype):
    if backend == "numpy":
        return dtype != "bfloat16"
    if backend == "torch":
        return True
    if backend == "strict":
        return dtype in ("float32", "float64")
    raise ValueError(backend)


def require(backend, dtype=None):
    """Skip the current test cleanly if the backend (or the backend/dtype pair) is unavailable."""
    if backend == "torch" and torch is None:
        pytest.skip("torch not installed")
    if backend == "strict" and array_api_strict is None:
        pytest.skip("array_api_strict not installed")
    if dtype is not None and not backend_supports(backend, dtype):
        pytest.skip(f"{backend} has no {dtype}")


def cupybn_or_skip():
    """Import cupybn; a missing package is an error (the suite tests it), not a skip."""
    import cupybn  # noqa: F401

    return cupybn


# --------------------------------------------------------------------------- rounding helpers

def round_bf16(a):
    """Round float64/float32 values to bfloat16 (round to nearest even), returned as float32."""
    f = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32).copy()
    nan = np.isnan(f)
    out[nan] = np.nan
    return out.reshape(np.shape(a))


def round_to(a, dtype):
    """Values of ``a`` rounded to ``dtype`` and returned as float64."""
    a = np.asarray(a, dtype=np.float64)
    if dtype == "bfloat16":
        return round_bf16(a).astype(np.float64)
    return a.astype(dtype).astype(np.float64)


def rounder(dtype):
    if dtype == "float64":
        return None
    return lambda a: round_to(a, dtype)


# --------------------------------------------------------------------------- conversion helpers

def torch_dtype(dtype):
    return getattr(torch, dtype)


def to_backend(a, backend, dtype=None):
    """Convert a NumPy array (any float dtype) to ``backend`` with ``dtype`` (default: a's dtype)."""
    a = np.asarray(a)
    if dtype is None:
        dtype = str(a.dtype)
    if backend == "numpy":
        if dtype == "bfloat16":
            raise ValueError("numpy has no bfloat16")
        return np.array(a, dtype=dtype, copy=True)
    if backend == "torch":
        if dtype == "bfloat16":
            return torch.from_numpy(np.array(a, dtype=np.float32)).to(torch.bfloat16)
        if a.dtype.kind == "f":
            return torch.from_numpy(np.array(a, dtype=dtype, copy=True))
        return torch.from_numpy(np.array(a, copy=True)).to(torch_dtype(dtype))
    if backend == "strict":
        return array_api_strict.asarray(np.array(a, dtype=dtype, copy=True))
    raise ValueError(backend)


def to_numpy(a):
    """Any supported array (or None) to a NumPy array; bfloat16 becomes float32 (exact)."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return a
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.numpy()
    if array_api_strict is not None and isinstance(a, array_api_strict._array_object.Array):
        return np.from_dlpack(a)
    return np.asarray(a)


def to_f64(a):
    return None if a is None else np.asarray(to_numpy(a), dtype=np.float64)


def dtype_name(a):
    """'float32' etc. for numpy / torch / array_api_strict arrays."""
    if isinstance(a, np.ndarray):
        return str(a.dtype)
    if torch is not None and isinstance(a, torch.Tensor):
        return str(a.dtype).replace("torch.", "")
    if array_api_strict is not None and isinstance(a, array_api_strict._array_object.Array):
        return str(a.dtype).replace("array_api_strict.", "")
    return str(getattr(a, "dtype", type(a)))


def is_backend(a, backend):
    if backend == "numpy":
        return type(a) is np.ndarray
    if backend == "torch":
        return isinstance(a, torch.Tensor) and a.device.type == "cpu"
    if backend == "strict":
        return isinstance(a, array_api_strict._array_object.Array)
    raise ValueError(backend)


def snapshot(*arrays):
    """Bitwise snapshot (dtype, shape, bytes) of arrays or Nones, for exactly-unchanged checks."""
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        n = np.ascontiguousarray(to_numpy(a))
        out.append((str(n.dtype), n.shape, n.tobytes()))
    return out


def layer_state_snapshot(layer):
    return snapshot(getattr(layer, "running_mean", None), getattr(layer, "running_var", None),
                    getattr(layer, "num_batches_tracked", None))


# --------------------------------------------------------------------------- comparisons

def assert_close(actual, expected, dtype, what="", seed=None, k=None, scale=None, rtol=None, atol=None):
    """Compare ``actual`` (any backend) with the float64 ``expected``.

    Tolerance by output dtype: float16/bfloat16 outputs are rounded, so allow ``k`` ulps
    (default 2) relative to ``scale`` (default max(1, max|expected|)); float32 a few 1e-5;
    float64 1e-10. NaN must match NaN; infinities must match exactly.
    """
    a = to_f64(actual)
    e = np.asarray(expected, dtype=np.float64)
    msg = f"{what} (seed={seed}, dtype={dtype})"
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}: {msg}"
    finite_e = e[np.isfinite(e)]
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(finite_e))) if finite_e.size else 1.0)
    if rtol is None or atol is None:
        if dtype in ("float16", "bfloat16"):
            kk = 2 if k is None else k
            r, t = kk * EPS[dtype], kk * EPS[dtype] * scale
        elif dtype == "float32":
            kk = 1 if k is None else k
            r, t = kk * 2e-5, kk * 2e-5 * scale
        else:
            kk = 1 if k is None else k
            r, t = kk * 1e-10, kk * 1e-10 * scale
        rtol = r if rtol is None else rtol
        atol = t if atol is None else atol
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=msg)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(params=BACKENDS)
def backend(request):
    require(request.param)
    return request.param


@pytest.fixture
def cupybn():
    return cupybn_or_skip()


@pytest.fixture
def seed(request):
    """A fresh random seed per test (or CUPYBN_TEST_SEED); recorded in the report and printed on failure."""
    s = int(os.environ.get("CUPYBN_TEST_SEED", secrets.randbits(32)))
    request.node.user_properties.append(("seed", s))
    print(f"random seed: {s}  (rerun with CUPYBN_TEST_SEED={s})")
    return s


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture
def has_torch():
    if torch is None:
        pytest.skip("torch not installed")
    return torch


# --------------------------------------------------------------------------- data helpers

def make_input(rng, shape, dtype, offset=0.5, scale=2.0, per_channel=True):
    """Random values already rounded to ``dtype``, as float64 (channel axis 1 gets its own offset)."""
    x = rng.standard_normal(shape) * scale + offset
    if per_channel and len(shape) >= 2 and shape[1] > 0:
        off = rng.uniform(-1.0, 1.0, size=shape[1]) * scale
        x = x + off.reshape((1, -1) + (1,) * (len(shape) - 2))
    return round_to(x, dtype)


def make_affine(rng, C, dtype="float32"):
    """weight in [0.5, 1.5], bias in [-0.5, 0.5], rounded to ``dtype``, as float64."""
    return round_to(rng.uniform(0.5, 1.5, size=C), dtype), round_to(rng.uniform(-0.5, 0.5, size=C), dtype)


def make_running(rng, C, dtype="float32"):
    return round_to(rng.standard_normal(C) * 0.5, dtype), round_to(rng.uniform(0.5, 2.0, size=C), dtype)


def param_dtype_for(dtype):
    """torch's mixed-precision rule: float16/bfloat16 inputs with float32 parameters."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


# --------------------------------------------------------------------------- layer helpers

BN_KINDS = {  # name -> (input rank(s) batched, unbatched rank or None)
    "BatchNorm1d": ((2, 3), None),
    "BatchNorm2d": ((4,), None),
    "BatchNorm3d": ((5,), None),
    "InstanceNorm1d": ((3,), 2),
    "InstanceNorm2d": ((4,), 3),
    "InstanceNorm3d": ((5,), 4),
}


def spatial_for(rank, rng=None):
    """A small spatial shape for an input of ``rank`` dims (N, C, *spatial)."""
    return {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}[rank]


def set_layer_params(layer, rng, affine_dtype="float32"):
    """Give a cupybn layer random weight/bias (and keep its other state) through load_state_dict with
    NumPy arrays. Returns the dict that was loaded (float64 copies)."""
    sd = {k: np.array(to_numpy(v), copy=True) for k, v in layer.state_dict().items()}
    for k in ("weight", "bias"):
        if k in sd:
            lo, hi = (0.5, 1.5) if k == "weight" else (-0.5, 0.5)
            sd[k] = round_to(rng.uniform(lo, hi, size=sd[k].shape), affine_dtype).astype(sd[k].dtype)
    layer.load_state_dict(sd)
    return {k: np.asarray(v, dtype=np.float64) for k, v in sd.items()}


def torch_twin(cupy_layer_cls_name, *args, **kwargs):
    return getattr(torch.nn, cupy_layer_cls_name)(*args, **kwargs)


def load_into_torch(tlayer, state):
    """Load a state dict of NumPy arrays (e.g. cupybn's) into a torch layer."""
    tlayer.load_state_dict({k: torch.as_tensor(np.array(to_numpy(v), copy=True)) for k, v in state.items()})
