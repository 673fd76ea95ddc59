"""The emulator recovers from kernel faults without touching anything of the test process's own.

A kernel that faults (guard page, stack overflow, division by zero) or spins until the watchdog interrupts it is
reported as a CudaCpuError and the process goes on. That recovery runs in a signal handler, so it must not
depend on the process: these tests pin what once corrupted the heap of the whole test suite. Every module used to
install its own handler and chain to the previous one, each link a frame on the signal stack, which on the main
thread is CPython faulthandler's (SIGSTKSZ + AT_MINSIGSTKSZ bytes from the malloc heap): with enough modules
loaded a fault ran past its end and overwrote the heap below it, and the process crashed much later, elsewhere.
"""
import ctypes
import gc
import mmap
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import emulator

pytestmark = pytest.mark.emulator

BROKEN = emulator.HERE / "broken_kernels.cu"
_libc = ctypes.CDLL(None, use_errno=True)


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


class PatternedSignalStack:
    """This thread's signal stack replaced by a pattern-filled one while in the with-block; `used()` is how many
    bytes of it any signal handler has written (the previous signal stack is restored on exit)."""

    SIZE = 1 << 18

    def __enter__(self):
        self.buf = mmap.mmap(-1, self.SIZE)
        self.buf.write(b"\xab" * self.SIZE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.old = _StackT()
        new = _StackT(self.addr, 0, self.SIZE)
        assert _libc.sigaltstack(ctypes.byref(new), ctypes.byref(self.old)) == 0, ctypes.get_errno()
        return self

    def current(self):
        cur = _StackT()
        assert _libc.sigaltstack(None, ctypes.byref(cur)) == 0
        return cur.ss_sp, cur.ss_size

    def used(self):
        data = self.buf[:]
        return self.SIZE - (len(data) - len(data.lstrip(b"\xab")))

    def __exit__(self, *exc):
        old = self.old
        if old.ss_flags & 2:  # SS_DISABLE
            old = _StackT(None, 2, 0)
        assert _libc.sigaltstack(ctypes.byref(old), None) == 0
        del self.addr
        self.buf.close()


@pytest.fixture(scope="module")
def bad():
    names = re.findall(r"__global__ void (\w+)\(", BROKEN.read_text())
    return emulator.build(BROKEN, ["broken::" + n for n in names])


@pytest.fixture(scope="module")
def more_modules(tmp_path_factory):
    """Six more modules, each launched once: before the fix, six more links in every fault's handler chain."""
    cu = tmp_path_factory.mktemp("mods") / "tiny.cu"
    cu.write_text("__global__ void add(int* y) { y[threadIdx.x] += OFFSET; }\n")
    mods = []
    for i in range(6):
        m = emulator.build(cu, ["add"], defines=["OFFSET=%d" % (i + 1)])
        y = m.zeros((32,), np.int32)
        m["add"](1, 32, y)
        assert (y == i + 1).all()
        mods.append(m)
    return mods


def test_faults_never_run_on_the_callers_signal_stack(bad, more_modules):
    """Kernel faults and watchdog nudges are handled on the emulator's own signal stack, whatever number of modules
    is loaded; the thread's own signal stack is back in place after each launch."""
    out = bad.zeros((1024,), np.float32)
    with PatternedSignalStack() as ss:
        before = ss.current()
        x = bad.array(np.ones(1000, np.float32))
        with pytest.raises(emulator.CudaCpuError, match="out-of-bounds read.*broken_kernels.cu"):
            bad["broken::oob_read"](4, 256, x, out, 1000, seed=0)
        with pytest.raises(emulator.CudaCpuError, match="stack overflow"):
            bad["broken::stack_overflow"](1, 32, bad.zeros((32,), np.int32), 100000)
        with pytest.raises(emulator.CudaCpuError, match="division by zero.*broken_kernels.cu"):
            bad["broken::int_div_zero"](1, 32, bad.zeros((32,), np.int32), bad.zeros((32,), np.int32))
        with bad.settings(timeout_ms=200), pytest.raises(emulator.CudaCpuError, match="watchdog"):
            bad["broken::spin_on_other_block"](2, 32, bad.zeros((1,), np.uint32), out[:2], seed=0)
        assert ss.current() == before
        assert ss.used() == 0, "a fault handler ran on the caller's signal stack (%d bytes)" % ss.used()
    # and every module still works
    for i, m in enumerate(more_modules):
        y = m.zeros((32,), np.int32)
        m["add"](1, 32, y)
        assert (y == i + 1).all()


def test_memory_is_not_unmapped_while_a_launch_runs(bad):
    """A finalizer in another thread that frees an emulator array waits for the running launch: the launch's page
    protections (traffic tracking) and fault classification never meet memory that was unmapped or reused."""
    core = emulator._core()
    ptr = core.cuda_cpu_alloc(1 << 16)
    flag, out = bad.zeros((1,), np.uint32), bad.zeros((2,), np.float32)

    def spin():  # block 0 spins until the watchdog stops it, 0.6 s after the launch began
        with pytest.raises(emulator.CudaCpuError, match="watchdog"):
            bad["broken::spin_on_other_block"](2, 32, flag, out, seed=0)

    with bad.settings(timeout_ms=600):
        t = threading.Thread(target=spin)
        t.start()
        time.sleep(0.15)  # the launch is running (it releases the GIL for its whole length)
        assert t.is_alive()
        start = time.perf_counter()
        core.cuda_cpu_free(ptr)
        waited = time.perf_counter() - start
        t.join()
    assert waited > 0.2, "free() returned after %.3f s, while the launch was still running" % waited


_SMALL_SIGNAL_STACK_SCRIPT = r"""
import ctypes, gc, re, sys
import numpy as np
import emulator
# CPython <= 3.10's faulthandler, or one built against a constant SIGSTKSZ: 16 KiB from the malloc heap.
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
class S(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]
assert libc.sigaltstack(ctypes.byref(S(libc.malloc(16384), 0, 16384)), None) == 0
broken, tiny = sys.argv[1], sys.argv[2]
names = re.findall(r"__global__ void (\w+)\(", open(broken).read())
bad = emulator.build(broken, ["broken::" + n for n in names])
bad["broken::stack_overflow"](1, 32, bad.zeros((32,), np.int32), 10)  # a clean launch first: bad's handler
for i in range(6):                                                      # was then the oldest in the chain
    m = emulator.build(tiny, ["add"], defines=["OFFSET=%d" % (i + 1)])
    m["add"](1, 32, m.zeros((32,), np.int32))
x, out = bad.array(np.ones(1000, np.float32)), bad.zeros((1024,), np.float32)
for _ in range(3):
    try:
        bad["broken::oob_read"](4, 256, x, out, 1000, seed=0)
        raise SystemExit("no fault reported")
    except emulator.CudaCpuError:
        pass
junk = [bytearray(n) for n in range(1, 20000, 7)]  # the heap in use after the faults
del junk
gc.collect()
print("ok")
"""


def test_faults_leave_a_small_heap_signal_stack_alone(bad, more_modules, tmp_path):
    """The crash itself: with a 16 KiB signal stack from the heap and six more modules loaded, the old chain of
    handlers ran ~3 KiB past its end into the heap below it, and the process died later (segmentation fault)."""
    script = tmp_path / "small_stack.py"
    script.write_text(_SMALL_SIGNAL_STACK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(emulator.HERE.parent))
    r = subprocess.run([sys.executable, str(script), str(BROKEN), str(more_modules[0].source)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
