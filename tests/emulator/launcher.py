"""The emulator launcher: runs planner output on the CPU through the CUDA emulator.

Same small interface as ``cupybn._cuda.launchers.CupyLauncher``::

    launcher.launch(plan)        # plan: a sequence of planner.KernelLaunch, run in order
    launcher.device_info()       # planner.DeviceInfo the plans are made for

plus what only a test needs: ``launcher.module(source)`` (the built emulator module, whose
``array`` / ``zeros`` / ``empty`` allocate guarded buffers and whose ``track`` counts traffic).

Each source file is built once with *all* of its instantiations from
``planner.INSTANTIATIONS`` (the list the NVRTC compile gate compiles), so the emulator runs the
same kernels the gate checked.

Arguments are checked against the signature the emulator reads from the compiled kernel, not
against what the planner believes: a Python ``int`` or ``float`` for a scalar parameter is
rejected (CuPy would pass it as a 64-bit integer / a double whatever the parameter is), and so
is a NumPy scalar of another width, so a marshalling bug fails here instead of on a GPU.
"""
from __future__ import annotations

from pathlib import Path

import emulator
import numpy as np
from cupybn._cuda import launchers, planner, source


class EmulatorLauncher:
    """Launch planner output on the CPU emulator.

    ``kernel_dir`` defaults to cupybn's kernels; tests point it at a folder holding a modified
    copy (a deliberately broken kernel) to show the checks catch it. ``device`` is the
    :class:`~cupybn._cuda.planner.DeviceInfo` plans are made for (a small ``sm_count`` makes the
    planner loop threads over rows even for small test shapes). ``seed`` fixes the emulator's
    block / thread schedule of every launch (``None``: the module's current seed).
    """

    def __init__(self, kernel_dir=None, device: planner.DeviceInfo | None = None, seed=None, defines=()):
        self.kernel_dir = Path(kernel_dir) if kernel_dir is not None else source.kernel_dir()
        self._device = device or planner.DeviceInfo()
        self.seed = seed
        self.defines = tuple(defines)
        self._modules = {}
        #: the zero-on-entry counters (planner.COUNTERS) of this launcher's "stream", allocated
        #: zeroed once and reused by every launch (the kernels leave them zero), grown on demand
        self.counters = None
        #: the scratch buffer (planner.SCRATCH) of the latest launch that needed one
        self.last_scratch = None

    def workspace(self, launch):
        """``(scratch, counters)`` for ``launch``: scratch is fresh, poisoned memory (0xFF, like
        stale memory from a pool); counters are the cached zeroed buffer (a new zeroed one when the
        cached one is too small), as the CuPy launcher does per device and stream."""
        scratch = None
        if launch.workspace_bytes:
            scratch = emulator.empty((launch.workspace_bytes,), np.uint8)
            self.last_scratch = scratch
        if launch.counter_words and (self.counters is None or self.counters.size < launch.counter_words):
            self.counters = emulator.zeros((max(launch.counter_words, 256),), np.uint32)
        return scratch, self.counters

    def module(self, source_name: str):
        """The emulator module of ``source_name``, built with every instantiation it holds."""
        mod = self._modules.get(source_name)
        if mod is None:
            kernels = list(planner.instantiations_for(source_name))
            if not kernels:
                raise KeyError(f"no instantiation of {source_name} in planner.INSTANTIATIONS")
            mod = emulator.build(self.kernel_dir / source_name, kernels=kernels,
                                 include_dirs=[str(self.kernel_dir)], defines=list(self.defines))
            self._modules[source_name] = mod
        return mod

    def device_info(self) -> planner.DeviceInfo:
        """The device description plans for this launcher are made with."""
        return self._device

    def prepare(self, plan):
        """A plan template (buffers as ``launchers.Slot``), for :meth:`run`: the CuPy launcher's
        interface. Arguments are checked when each bound launch runs (:meth:`launch`)."""
        for launch in plan:
            launchers.check_template(launch)
        return tuple(launchers.PreparedLaunch(launch) for launch in plan)

    def run(self, prepared, buffers) -> None:
        """Run a prepared plan with ``buffers[i]`` for slot ``i`` (through :meth:`launch`)."""
        self.launch(tuple(p.bound(buffers) for p in prepared))

    def launch(self, plan) -> None:
        """Run every launch of ``plan`` in order; raises ``emulator.CudaCpuError`` on a detected bug."""
        for launch in plan:
            launch = launch.with_workspace(*self.workspace(launch))
            kernel = self.module(launch.source)[launch.kernel]
            signature = tuple(kernel.signature)
            if signature != tuple(launch.signature):
                raise TypeError(f"{launch.kernel}: the planner declares parameters {launch.signature}, "
                                f"the compiled kernel has {signature}")
            check_args(launch.kernel, signature, launch.args)
            kernel(launch.grid, launch.block, *launch.args, smem=launch.smem, seed=self.seed)


def check_args(kernel: str, signature, args) -> None:
    """TypeError unless ``args`` marshal exactly to ``signature`` (see ``planner.check_args``),
    and every array is a C-contiguous NumPy array (what the emulator can pass as a pointer)."""
    planner.check_args(kernel, signature, args)
    for i, (code, arg) in enumerate(zip(signature, args)):
        if code.startswith("p:") and arg is not None:
            if not hasattr(arg, "ctypes") or not arg.flags.c_contiguous:
                raise TypeError(f"{kernel}: argument {i} must be a C-contiguous NumPy array allocated by "
                                "the emulator module")
