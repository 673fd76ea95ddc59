"""A host-memory stand-in for CuPy, and a launcher that records launches instead of running them.

``bench/host.py`` and the prepared-call tests run cupybn's real GPU path -- dispatch, prepared
call, planner, launch objects -- on a machine without a GPU. :func:`installed` puts this module
in ``sys.modules["cupy"]`` and the :class:`RecordingLauncher` in place of the CuPy launcher; the
arrays are NumPy memory of type :class:`ndarray`, which cupybn routes to the GPU path as it does
``cupy.ndarray``. Nothing here executes a kernel: that is the emulator's job (``tests/emulator``).
"""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np

from cupybn._cuda import launchers, planner


class _Memory:
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


class _Device:
    __slots__ = ("id",)

    def __init__(self, id=0):  # noqa: A002 - CuPy's name
        self.id = id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def attributes(self):
        return {"MultiProcessorCount": 132, "MaxThreadsPerMultiProcessor": 2048,
                "MaxGridDimX": 2**31 - 1, "MaxGridDimY": 65535}


class ndarray(np.ndarray):  # noqa: N801 - CuPy's name
    """A NumPy array that cupybn treats as a CuPy array (device 0)."""

    @property
    def data(self):
        return _Memory(self.__array_interface__["data"][0])

    @property
    def device(self):
        return _Device(0)


def _device_array(a):
    return a.view(ndarray)


def empty(shape, dtype=np.float32, order="C"):
    return _device_array(np.empty(shape, dtype, order))


def zeros(shape, dtype=np.float32):
    return _device_array(np.zeros(shape, dtype))


def asarray(a, dtype=None):
    return _device_array(np.asarray(a, dtype))


def ascontiguousarray(a):
    return a if a.flags.c_contiguous else _device_array(np.ascontiguousarray(a))


def from_dlpack(a):
    return _device_array(np.from_dlpack(a))


broadcast_to, where = np.broadcast_to, np.where
float16, float32, float64, int16, int64, uint8, uint16, uint32 = (
    np.float16, np.float32, np.float64, np.int16, np.int64, np.uint8, np.uint16, np.uint32)


class _Stream:
    ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


cuda = types.SimpleNamespace(Device=_Device, get_current_stream=lambda: _Stream(), Stream=_Stream,
                             ExternalStream=lambda *a: _Stream(), is_available=lambda: True,
                             runtime=types.SimpleNamespace(getDevice=lambda: 0))


class RecordingLauncher(launchers.CupyLauncher):
    """The CuPy launcher with the kernel call replaced by a record of it.

    Everything before the call runs as on a GPU: workspace allocation, argument binding and
    marshalling. ``launches`` counts kernel calls; ``last`` holds the latest ``(kernel, grid,
    block, args, smem)``.
    """

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.last = None

    def device_info(self) -> planner.DeviceInfo:
        return planner.DeviceInfo()

    def module(self, source_name: str, kernel: str):
        recorder = self

        class _Module:
            @staticmethod
            def get_function(name):
                def record(grid, block, args, shared_mem=0):
                    recorder.launches += 1
                    recorder.last = (name, grid, block, args, shared_mem)
                return record
        return _Module


@contextlib.contextmanager
def installed():
    """This module as ``cupy`` and a :class:`RecordingLauncher` as the process's CuPy launcher,
    for the duration of the block: yields the launcher."""
    saved_module = sys.modules.get("cupy")
    saved_launcher = launchers._default
    launcher = RecordingLauncher()
    sys.modules["cupy"] = sys.modules[__name__]
    launchers._default = launcher
    try:
        yield launcher
    finally:
        if saved_module is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved_module
        launchers._default = saved_launcher
