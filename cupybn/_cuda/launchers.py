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


class Slot:
    """A buffer placeholder in a plan template: argument ``index`` of the buffers a prepared call
    binds per call. ``dtype`` is the buffer's storage dtype, so ``planner.check_args`` can check
    the template once."""

    __slots__ = ("index", "dtype")

    def __init__(self, index: int, dtype):
        self.index, self.dtype = index, np.dtype(dtype)

    def __repr__(self) -> str:
        return f"Slot({self.index}, {self.dtype})"


_CHECK_SCRATCH = Slot(-1, np.uint8)
_CHECK_COUNTERS = Slot(-1, np.uint32)


class PreparedLaunch:
    """One launch of a plan template, checked once: ``args`` with the slot positions to fill."""

    __slots__ = ("launch", "function", "args", "slots", "scratch", "counters")

    def __init__(self, launch: planner.KernelLaunch, function=None):
        self.launch, self.function = launch, function
        self.args = list(launch.args)
        self.slots = tuple((j, a.index) for j, a in enumerate(launch.args) if type(a) is Slot)
        self.scratch = tuple(j for j, a in enumerate(launch.args) if a is planner.SCRATCH)
        self.counters = tuple(j for j, a in enumerate(launch.args) if a is planner.COUNTERS)

    def uses(self, index: int) -> bool:
        """Whether this launch reads or writes buffer ``index``."""
        return any(i == index for _, i in self.slots)

    def bind(self, buffers, scratch=None, counters=None) -> list:
        """The argument list with every slot replaced by its buffer (None stays a null pointer);
        ``scratch`` / ``counters`` replace ``planner.SCRATCH`` / ``COUNTERS`` when given."""
        args = self.args.copy()
        for j, i in self.slots:
            args[j] = buffers[i]
        if scratch is not None:
            for j in self.scratch:
                args[j] = scratch
        if counters is not None:
            for j in self.counters:
                args[j] = counters
        return args

    def bound(self, buffers) -> planner.KernelLaunch:
        """The planner's launch with the slots bound (workspace placeholders left for the launcher)."""
        launch = self.launch
        return planner.KernelLaunch(launch.source, launch.kernel, launch.grid, launch.block, tuple(self.bind(buffers)),
                                    launch.signature, launch.smem, launch.workspace_bytes, launch.notes,
                                    launch.counter_words)


def check_template(launch: planner.KernelLaunch) -> None:
    """``planner.check_args`` on a plan template (slots stand for buffers of their dtype)."""
    planner.check_args(launch.kernel, launch.signature, launch.with_workspace(_CHECK_SCRATCH, _CHECK_COUNTERS).args)


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

    def prepare(self, plan) -> tuple[PreparedLaunch, ...]:
        """A plan template (buffers as :class:`Slot`) checked and its kernels resolved, for :meth:`run`."""
        prepared = []
        for launch in plan:
            check_template(launch)
            p = PreparedLaunch(launch, self.module(launch.source, launch.kernel).get_function(launch.kernel))
            p.args = list(_marshal(p.args))  # absent optional buffers: null pointers, once
            prepared.append(p)
        return tuple(prepared)

    def run(self, prepared, buffers) -> None:
        """Run a prepared plan on the current CuPy stream with ``buffers[i]`` for slot ``i``."""
        for p in prepared:
            launch = p.launch
            scratch = counters = None
            if launch.workspace_bytes:
                import cupy

                scratch = cupy.empty((launch.workspace_bytes,), dtype=cupy.uint8)
            if launch.counter_words:
                counters = self.counters(launch.counter_words)
            p.function(launch.grid, launch.block, tuple(p.bind(buffers, scratch, counters)), shared_mem=launch.smem)

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
