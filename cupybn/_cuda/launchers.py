"""The CuPy launcher: compiles kernels with ``cupy.RawModule`` (NVRTC) and launches planner output.

Both launchers (this one, and ``tests/emulator/launcher.py`` for the CPU emulator) share one
small interface::

    launcher.launch(plan)        # plan: a sequence of planner.KernelLaunch, run in order
    launcher.device_info()       # planner.DeviceInfo of the device the launches run on

so the planner code that runs on the GPU is the code the emulator tests drive.

Here every launch goes to the *current* CuPy stream (callers that run on torch's stream make it
current first, see interop.py). Compiled modules are cached per (device, source, kernel) in this
process; CuPy caches the compiled binaries on disk across processes (the program text carries a
digest of the kernel files, so an edited header never hits a stale entry).
"""
from __future__ import annotations

import threading

import numpy as np

from . import planner, source


class CupyLauncher:
    """Launch planner output through ``cupy.RawModule`` on the current CuPy stream."""

    def __init__(self, kernel_dir=None):
        self._kernel_dir = kernel_dir
        self._modules = {}
        self._device_info = {}
        self._counters = {}
        self._lock = threading.Lock()

    def counters(self, words: int):
        """The zero-on-entry counters (``planner.COUNTERS``) of the current device and stream.

        Allocated zeroed once per (device, stream) and reused by every launch on that stream: the
        kernels reset every counter they use before they exit, so the buffer is all zero between
        launches and no launch needs a memset (a graph that captured a launch replays correctly).
        A launch that needs more counters than cached gets a new zeroed buffer (the old one, used
        only on this stream, goes back to the pool in stream order). At least 4096 words, so the
        first allocation usually serves every later launch.
        """
        import cupy

        key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
        buf = self._counters.get(key)
        if buf is None or buf.size < words:
            with self._lock:
                buf = self._counters.get(key)
                if buf is None or buf.size < words:
                    buf = cupy.zeros((max(words, 4096),), dtype=cupy.uint32)
                    self._counters[key] = buf
        return buf

    def module(self, source_name: str, kernel: str):
        """The compiled ``RawModule`` of ``kernel`` (a name expression) on the current device."""
        import cupy

        key = (cupy.cuda.Device().id, source_name, kernel)
        mod = self._modules.get(key)
        if mod is None:
            with self._lock:
                mod = self._modules.get(key)
                if mod is None:
                    # One instantiation per module: the first call of a dtype combination compiles
                    # only that kernel (NVRTC time grows with the number of instantiations).
                    mod = cupy.RawModule(code=source.program_text(source_name, self._kernel_dir),
                                         options=source.nvrtc_options(self._kernel_dir),
                                         name_expressions=(kernel,))
                    self._modules[key] = mod
        return mod

    def device_info(self) -> planner.DeviceInfo:
        """SM count and limits of the current device (cached per device)."""
        import cupy

        dev = cupy.cuda.Device()
        info = self._device_info.get(dev.id)
        if info is None:
            attrs = dev.attributes
            info = planner.DeviceInfo(sm_count=int(attrs["MultiProcessorCount"]),
                                      max_threads_per_sm=int(attrs["MaxThreadsPerMultiProcessor"]),
                                      max_grid_x=int(attrs["MaxGridDimX"]),
                                      max_grid_y=int(attrs["MaxGridDimY"]))
            self._device_info[dev.id] = info
        return info

    def launch(self, plan) -> None:
        """Run every launch of ``plan`` in order on the current CuPy stream (asynchronously)."""
        for launch in plan:
            if launch.workspace_bytes or launch.counter_words:
                import cupy

                # scratch: from CuPy's pool, stream-ordered on the current stream, so freeing it
                # after the (asynchronous) launch is safe
                scratch = cupy.empty((launch.workspace_bytes,), dtype=cupy.uint8) if launch.workspace_bytes else None
                counters = self.counters(launch.counter_words) if launch.counter_words else None
                launch = launch.with_workspace(scratch, counters)
            planner.check_args(launch.kernel, launch.signature, launch.args)
            kernel = self.module(launch.source, launch.kernel).get_function(launch.kernel)
            kernel(launch.grid, launch.block, _marshal(launch.args), shared_mem=launch.smem)


def _marshal(args):
    # None is a null pointer: an 8-byte zero, spelled as a NumPy scalar so CuPy passes 8 bytes.
    return tuple(np.uint64(0) if a is None else a for a in args)


_default = None


def cupy_launcher() -> CupyLauncher:
    """The process-wide CuPy launcher (its module cache lives as long as the process)."""
    global _default
    if _default is None:
        _default = CupyLauncher()
    return _default
