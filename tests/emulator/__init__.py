"""CUDA emulator for cupybn's tests: runs the project's unmodified kernels (kernels/*.cu) on the CPU.

No machine that runs the test suite needs a GPU.  A kernel file is compiled by g++ with ``cuda_cpu.h``
force-included (and ``include/`` shims for the CUDA headers) into a shared library, one per
:func:`build` call, cached on disk.  Every CUDA thread runs as a fiber; fibers and blocks are scheduled in
a seeded random order, and the emulator reports what a GPU would silently get wrong or hang on::

    import emulator
    mod = emulator.build("kernels/bn.cu", kernels=["cupybn::bn_fwd<float, 4>"], include_dirs=["kernels"])
    x = mod.array(np.random.rand(1000).astype(np.float32))   # page-aligned, guard pages both sides
    y = mod.zeros((1000,), np.float32)
    mod["cupybn::bn_fwd<float, 4>"](4, 256, x, y, 1000, smem=0, seed=7)  # raises emulator.CudaCpuError
    with mod.track(x=x, y=y) as t:                          # page-granular traffic per launch
        ...launches...
    t.passes("x")                                           # bytes of x touched / x.nbytes, summed

Detected: barrier divergence (exit or different call sites, with file:line), warp-mask misuse, deadlocks,
grid-barrier misuse, out-of-bounds accesses past either end of a buffer, misaligned typed accesses and
out-of-bounds indices into fixed-size arrays (sanitizer checks), stack overflow, spin-waits that never
finish (watchdog).  Order-dependent results show up as results that change with the schedule seed.

Schedules: ``seed=0`` runs blocks in order and threads FIFO; any other seed randomizes both.  The default
seed is 1, or ``$CUPYBN_EMULATOR_SEED``.  Cooperative launches (``cooperative=True``) run every block on
its own OS thread, so blocks are co-resident and ``cooperative_groups::this_grid().sync()`` works.

Memory is process-wide: arrays allocated through any module can be passed to every module's kernels.
Build outputs go to ``$CUPYBN_EMULATOR_CACHE`` or ``tests/emulator/build/``.
"""
import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np

__all__ = ["build", "Module", "Kernel", "Traffic", "CudaCpuError", "ArgumentError", "array", "zeros", "empty",
           "f32_to_bf16_bits", "bf16_bits_to_f32", "cache_dir", "MAX_DYN_SMEM"]

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_cpu.h"
RUNTIME = HERE / "cuda_cpu_rt.cpp"
SHIM_INCLUDE = HERE / "include"
CXX = os.environ.get("CUPYBN_EMULATOR_CXX", "g++")
MAX_DYN_SMEM = 227 * 1024
DEFAULT_ARCH = 800  # __CUDA_ARCH__ seen by kernel files, as under NVRTC for sm_80
POISON_EMPTY_MAX = 256 << 20  # empty() fills buffers up to this size with 0xFF (NaN) bytes

# DWARF 4: binutils 2.40 addr2line misnames files of DWARF 5 line tables for #included sources
_FLAGS = ["-std=c++17", "-gdwarf-4", "-fPIC", "-pthread", "-fvisibility=hidden", "-fno-strict-aliasing",
          "-fno-gnu-unique",  # each module keeps its own copy of the runtime's inline thread_local state
          # GPU integer arithmetic wraps; nothing is FMA-contracted implicitly (nvcc would: expect ulp differences)
          "-fwrapv", "-ffp-contract=off", "-fno-math-errno",
          "-Wall", "-Wno-unused-function", "-Wno-unused-variable", "-Wno-unused-but-set-variable",
          "-Wno-unknown-pragmas"]
try:  # inline fmaf() where the build machine (== the machine running the tests) has FMA
    if " fma " in Path("/proc/cpuinfo").read_text():
        _FLAGS.append("-mfma")
except OSError:
    pass
# Misaligned typed accesses (a float4 load at an unaligned offset: "misaligned address" on the GPU) and indices
# out of bounds of fixed-size arrays (__shared__ float s[256]) call handlers in cuda_cpu_rt.cpp, which report
# them with file:line (no libubsan involved).
_UB_FLAGS = ["-fsanitize=alignment,bounds", "-fno-sanitize-recover=alignment,bounds"]

# Headers a kernel file may include with <...>: what NVRTC provides (shimmed in include/), and stdint.h.
ALLOWED_SYSTEM_HEADERS = frozenset([
    "cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h", "cooperative_groups.h", "stdint.h", "cuda_runtime_api.h",
    "device_launch_parameters.h", "vector_types.h"])


class CudaCpuError(RuntimeError):
    """A launch failed: a bug the emulator detected, an invalid launch, or a build error."""


class ArgumentError(CudaCpuError, TypeError):
    """Kernel arguments that do not match the kernel's signature (also a TypeError)."""


def cache_dir():
    d = Path(os.environ.get("CUPYBN_EMULATOR_CACHE") or HERE / "build")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


# ----------------------------------------------------------------------------------------------- building
def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CudaCpuError("command failed: %s\n%s%s" % (" ".join(map(str, cmd)), r.stdout, r.stderr))
    return r


def _atomic_write(path, data):
    """Write bytes so that concurrent builders (pytest-xdist, two CI jobs) never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sym(kernel):
    """C symbol of a kernel expression; the hash keeps e.g. "a::b" and "a_b" apart."""
    digest = hashlib.sha1(kernel.encode()).hexdigest()[:8]
    return "cck_%s_%s" % (re.sub(r"\W+", "_", kernel).strip("_")[:80], digest)


def _normalize_expr(k):
    return re.sub(r"\s+", "", k)


_compiler_id = None


def _compiler_version():
    global _compiler_id
    if _compiler_id is None:
        _compiler_id = _run([CXX, "--version"]).stdout.splitlines()[0]
    return _compiler_id


def _strip_comments_and_strings(src):
    pattern = r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\''

    def repl(m):
        s = m.group(0)
        return "\n" * s.count("\n") if s.startswith("/") else '""'

    return re.sub(pattern, repl, src, flags=re.S)


def lint_source(path):
    """Problems that would make a kernel file compile here but not under NVRTC: system headers other than the
    CUDA ones (and stdint.h), and the C++ standard library (std::, cuda::std::)."""
    text = _strip_comments_and_strings(Path(path).read_text(errors="replace"))
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*#\s*include\s*<([^>]+)>", line)
        if m and m.group(1).strip() not in ALLOWED_SYSTEM_HEADERS:
            problems.append("%s:%d: #include <%s>: NVRTC provides only %s" % (
                path, lineno, m.group(1), ", ".join(sorted(ALLOWED_SYSTEM_HEADERS))))
        if re.search(r"(?<![\w:])(cuda::)?std::", line):
            problems.append("%s:%d: uses the C++ standard library (std::), which NVRTC does not have: %s" % (
                path, lineno, line.strip()))
    return problems


def _deps(glue_path, flags, incs):
    """User headers the glue (i.e. the kernel file) includes, from g++ -MM: they are part of the cache key."""
    out = _run([CXX] + flags + incs + ["-include", str(HEADER), "-MM", "-x", "c++", str(glue_path)]).stdout
    out = out.replace("\\\n", " ").replace("\\ ", "\0")
    files = out.split(":", 1)[1].split()
    return sorted({str(Path(f.replace("\0", " ")).resolve()) for f in files} - {str(glue_path.resolve())})


_memo = {}  # (glue, flags, includes, lint) -> (dependency stats, Module): build() in the same process is cheap
_memo_lock = threading.RLock()
_modules = {}  # .so path -> Module


def _stat(files):
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((f, None, None))
    return tuple(out)


def build(cu, kernels=(), *, include_dirs=(), defines=(), arch=DEFAULT_ARCH, name=None, opt="-O2", check_ub=True,
          lint=True, extra_flags=()):
    """Compile the kernel file `cu` into a module exporting one entry point per kernel expression in `kernels`
    (plain names or template instantiations such as ``"ns::k<float, 4>"``).  Cached on disk and per process.

    include_dirs: extra -I directories (after the CUDA header shims); defines: "NAME" / "NAME=VALUE" strings or a
    dict; arch: the value of __CUDA_ARCH__; check_ub: trap misaligned accesses and out-of-bounds indices into
    fixed-size arrays; lint: reject what NVRTC would not compile (other system headers, std::)."""
    cu = Path(cu).resolve()
    if not cu.is_file():
        raise FileNotFoundError(cu)
    kernels = [kernels] if isinstance(kernels, str) else list(kernels)
    if isinstance(defines, dict):
        defines = ["%s=%s" % (k, v) if v is not None else k for k, v in defines.items()]
    flags = _FLAGS + [opt] + (_UB_FLAGS if check_ub else []) + ["-D__CUDA_ARCH__=%d" % int(arch)]
    flags += ["-D" + d for d in defines] + list(extra_flags)
    incs = ["-I", str(SHIM_INCLUDE)] + [a for d in include_dirs for a in ("-I", str(Path(d).resolve()))]
    glue = '#include "%s"\n' % cu + "".join("CUDA_CPU_EXPORT(%s, %s)\n" % (_sym(k), k) for k in kernels)
    mod = _build(glue, flags, incs, name or cu.stem, kernels, lint=lint, source=cu)
    return mod


def _build(glue, flags, incs, name, kernels, lint=False, source=None):
    key = (glue, tuple(flags), tuple(incs), lint)
    with _memo_lock:
        hit = _memo.get(key)
        if hit and _stat([d for d, _, _ in hit[0]]) == hit[0]:
            return hit[1]
        cache = cache_dir()
        src_dir = cache / "src"
        src_dir.mkdir(exist_ok=True)
        glue_path = src_dir / ("glue-%s.cpp" % hashlib.sha1(glue.encode()).hexdigest()[:16])
        if not glue_path.exists():
            _atomic_write(glue_path, glue.encode())
        deps = _deps(glue_path, flags, incs)
        if lint:
            own = (str(HERE) + os.sep,)
            problems = [p for d in deps if not d.startswith(own) for p in lint_source(d)]
            if problems:
                raise CudaCpuError("kernel source would not compile under NVRTC (build(lint=False) skips this "
                                   "check):\n  " + "\n  ".join(problems))
        stats = _stat(deps)
        h = hashlib.sha256()
        for part in [glue, " ".join(flags), " ".join(incs), _compiler_version()]:
            h.update(part.encode() + b"\0")
        for d in deps + [str(RUNTIME)]:
            h.update(d.encode() + b"\0" + Path(d).read_bytes() + b"\0")
        tag = "%s-%s" % (re.sub(r"[^\w.-]", "_", name)[:60], h.hexdigest()[:16])
        so = cache / (tag + ".so")
        if not so.exists():
            _compile(glue_path, flags, incs, so)
        mod = _modules.get(str(so))
        if mod is None:
            mod = _modules[str(so)] = Module(so, kernels, source=source)
        _memo[key] = (stats, mod)
        return mod


def _runtime_object(flags, cache):
    """cuda_cpu_rt.cpp compiled once per flag set (no sanitizer: the runtime is trusted)."""
    rt_flags = [f for f in flags if f not in _UB_FLAGS and not f.startswith("-D")]
    h = hashlib.sha256((" ".join(rt_flags) + _compiler_version()).encode() + RUNTIME.read_bytes() +
                       HEADER.read_bytes()).hexdigest()[:16]
    obj = cache / ("cuda_cpu_rt-%s.o" % h)
    return obj, ([CXX] + rt_flags + ["-c", str(RUNTIME), "-o"], obj.exists())


def _compile(glue_path, flags, incs, so):
    cache = so.parent
    tmp = Path(tempfile.mkdtemp(prefix=so.stem + ".", dir=cache))
    try:
        rt_obj, (rt_cmd, rt_ok) = _runtime_object(flags, cache)
        procs = []
        if not rt_ok:  # both compiles in parallel
            rt_tmp = tmp / "rt.o"
            procs.append(subprocess.Popen(rt_cmd + [str(rt_tmp)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        glue_o = tmp / "glue.o"
        procs.append(subprocess.Popen([CXX] + flags + incs + ["-include", str(HEADER), "-c", "-x", "c++",
                                                              str(glue_path), "-o", str(glue_o)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        errors = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                errors.append("%s\n%s" % (" ".join(p.args), out))
        if errors:
            raise CudaCpuError("emulator build failed:\n" + "\n".join(errors))
        if not rt_ok:
            os.replace(rt_tmp, rt_obj)
        # Every undefined TLS symbol of the kernel object is an `extern __shared__ T name[]` (dynamic shared
        # memory): define all of them as aliases of one buffer, as CUDA does.
        syms = []
        for line in _run(["readelf", "-sW", str(glue_o)]).stdout.splitlines():
            f = line.split()
            if len(f) >= 8 and f[3] == "TLS" and f[4] == "GLOBAL" and f[6] == "UND":
                syms.append(f[7])
        asm = ['.section .tbss,"awT",@nobits', ".p2align 7"]
        for s in ["__cuda_cpu_dynsmem"] + syms:
            asm += [".globl %s" % s, ".hidden %s" % s, ".type %s,@object" % s, ".size %s,%d" % (s, MAX_DYN_SMEM),
                    "%s:" % s]
        asm += [".zero %d" % MAX_DYN_SMEM, '.section .note.GNU-stack,"",@progbits', ""]
        (tmp / "dynsmem.s").write_text("\n".join(asm))
        _run([CXX, "-shared", "-pthread", "-o", str(tmp / "lib.so"), str(glue_o), str(rt_obj),
              str(tmp / "dynsmem.s"), "-ldl"])
        os.replace(tmp / "lib.so", so)  # atomic: a concurrent builder of the same tag wrote identical bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- memory core
_core_mod = None


def _declare_api(lib):
    lib.cuda_cpu_last_error.restype = ctypes.c_char_p
    lib.cuda_cpu_set.argtypes = [ctypes.c_char_p, ctypes.c_longlong]
    lib.cuda_cpu_get.argtypes = [ctypes.c_char_p]
    lib.cuda_cpu_get.restype = ctypes.c_longlong
    lib.cuda_cpu_alloc.argtypes = [ctypes.c_size_t]
    lib.cuda_cpu_alloc.restype = ctypes.c_void_p
    lib.cuda_cpu_free.argtypes = [ctypes.c_void_p]
    lib.cuda_cpu_region.argtypes = [ctypes.c_void_p]
    lib.cuda_cpu_region_info.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)]
    lib.cuda_cpu_track.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.cuda_cpu_region_traffic.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)]
    lib.cuda_cpu_core.restype = ctypes.c_void_p
    lib.cuda_cpu_bind_core.argtypes = [ctypes.c_void_p]


def _core():
    """The library that owns all memory: the runtime alone, built from no kernels.  Every module is bound to it."""
    global _core_mod
    if _core_mod is not None:
        return _core_mod
    with _memo_lock:
        if _core_mod is None:
            cache = cache_dir()
            flags = _FLAGS + ["-O2"]
            glue_path = cache / "src" / "core.cpp"
            glue_path.parent.mkdir(exist_ok=True)
            if not glue_path.exists():
                _atomic_write(glue_path, b"// emulator memory core: the runtime alone\n")
            h = hashlib.sha256((" ".join(flags) + _compiler_version()).encode() + RUNTIME.read_bytes() +
                               HEADER.read_bytes()).hexdigest()[:16]
            so = cache / ("core-%s.so" % h)
            if not so.exists():
                _compile(glue_path, flags, ["-I", str(SHIM_INCLUDE)], so)
            lib = ctypes.CDLL(str(so))
            _declare_api(lib)
            _core_mod = lib
        return _core_mod


class _Buffer:
    """Owner of one emulator allocation; numpy arrays over it keep it alive, and it is freed with them."""

    def __init__(self, ptr, nbytes):
        self.__array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}
        weakref.finalize(self, _core().cuda_cpu_free, ptr)


def empty(shape, dtype, poison=True):
    """Uninitialized array in emulator memory: page-aligned, PROT_NONE guard pages before and after, trackable.
    Filled with 0xFF bytes (NaN for floats) like stale GPU memory, unless larger than POISON_EMPTY_MAX."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    p = _core().cuda_cpu_alloc(max(nbytes, 1))
    if not p:
        raise MemoryError("emulator allocation of %d bytes failed" % nbytes)
    a = np.asarray(_Buffer(p, nbytes)).view(dtype).reshape(shape)
    if poison and 0 < nbytes <= POISON_EMPTY_MAX:
        a.view(np.uint8).reshape(-1)[:] = 0xFF
    return a


def zeros(shape, dtype):
    """Zero-filled array in emulator memory (fresh pages are zero: large buffers stay unbacked until touched)."""
    return empty(shape, dtype, poison=False)


def array(src, dtype=None):
    """Copy of `src` in emulator memory (C order)."""
    src = np.asarray(src, dtype=dtype)
    a = empty(src.shape, src.dtype, poison=False)
    a[...] = src
    return a


def _region(ptr):
    """(region id, base, size) of the emulator allocation containing address ptr, or None."""
    core = _core()
    rid = core.cuda_cpu_region(ptr)
    if rid < 0:
        return None
    out = (ctypes.c_ulonglong * 2)()
    core.cuda_cpu_region_info(rid, out)
    return rid, out[0], out[1]


# ----------------------------------------------------------------------------------------------- bf16 helpers
def f32_to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN -> 0x7FFF (as the GPU)."""
    a = np.array(a, dtype=np.float32)  # a contiguous copy; keeps 0-d inputs 0-d
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FFF), r).astype(np.uint16)


def bf16_bits_to_f32(b):
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------------------------- kernels
_DT = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "bf16": np.uint16, "i8": np.int8, "u8": np.uint8,
       "i16": np.int16, "u16": np.uint16, "i32": np.int32, "u32": np.uint32, "i64": np.int64, "u64": np.uint64,
       "b8": np.bool_}
_CT = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i8": ctypes.c_int8, "u8": ctypes.c_uint8,
       "i16": ctypes.c_int16, "u16": ctypes.c_uint16, "i32": ctypes.c_int32, "u32": ctypes.c_uint32,
       "i64": ctypes.c_int64, "u64": ctypes.c_uint64, "b8": ctypes.c_bool, "f16": ctypes.c_uint16,
       "bf16": ctypes.c_uint16}
_VEC = re.compile(r"^([a-z]+\d+)x(\d)$")


def _vec_align(elem, n):
    size = np.dtype(_DT[elem]).itemsize
    return size if n == 3 else min(16, size * n)


def _pack_scalar(code, v, where):
    """One scalar of type `code` as a ctypes value; strict about kinds and ranges."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if code in ("f32", "f64", "f16", "bf16"):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ArgumentError("%s: expected a number for %s, got %r" % (where, code, type(v).__name__))
        if code == "f16":
            return ctypes.c_uint16(int(np.float16(v).view(np.uint16)))
        if code == "bf16":
            return ctypes.c_uint16(int(f32_to_bf16_bits(np.float32(v))))
        return _CT[code](float(v))
    if code == "b8":
        if not isinstance(v, (bool, np.bool_, int, np.integer)) or int(v) not in (0, 1):
            raise ArgumentError("%s: expected a bool, got %r" % (where, v))
        return ctypes.c_bool(bool(v))
    if code in _CT:  # integers
        if isinstance(v, (float, np.floating)) or not isinstance(v, (int, np.integer, bool, np.bool_)):
            raise ArgumentError("%s: expected an integer for %s, got %r" % (where, code, type(v).__name__))
        info = np.iinfo(_DT[code])
        if not info.min <= int(v) <= info.max:
            raise ArgumentError("%s: %d does not fit in %s" % (where, int(v), code))
        return _CT[code](int(v))
    raise ArgumentError("%s: cannot pass a value of type %s" % (where, code))


class Kernel:
    """One kernel instantiation of a module; call it as ``k(grid, block, *args, smem=0, seed=None,
    cooperative=False)``."""

    def __init__(self, mod, name):
        self.mod, self.name = mod, name
        sym = _sym(name)
        self._fn = getattr(mod.lib, sym)
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p),
                                                                 ctypes.POINTER(ctypes.c_longlong)]
        sig = getattr(mod.lib, sym + "__sig")
        sig.restype = ctypes.c_char_p
        s = sig().decode()
        #: parameter type codes, e.g. ("p:f32", "i32", "f32"); vectors "f32x4", pointers "p:<pointee>"
        self.signature = tuple(s.split(",")) if s else ()

    def __repr__(self):
        return "<emulator kernel %s(%s)>" % (self.name, ", ".join(self.signature))

    def _pack(self, code, v, i):
        where = "%s argument %d (%s)" % (self.name, i, code)
        if code.startswith("p:"):
            return self._pack_pointer(code[2:], v, where)
        m = _VEC.match(code)
        if m:
            elem, n = m.group(1), int(m.group(2))
            vals = list(np.asarray(v).reshape(-1)) if not np.isscalar(v) else None
            if vals is None or len(vals) != n:
                raise ArgumentError("%s: expected %d values" % (where, n))
            packed = [_pack_scalar(elem, x, where) for x in vals]
            return (_CT[elem] * n)(*[p.value for p in packed])
        if code.startswith("s"):
            size = int(code[1:])
            b = bytes(v) if isinstance(v, (bytes, bytearray, memoryview, ctypes.Structure)) else (
                v.tobytes() if isinstance(v, (np.ndarray, np.generic)) else None)
            if b is None or len(b) != size:
                raise ArgumentError("%s: expected %d bytes (a by-value struct)" % (where, size))
            return (ctypes.c_char * size).from_buffer_copy(b)
        return _pack_scalar(code, v, where)

    def _pack_pointer(self, pointee, v, where):
        if v is None:
            return ctypes.c_void_p(0)
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):  # raw device address
            if int(v) and _region(int(v)) is None:
                raise ArgumentError("%s: address 0x%x is not inside emulator memory" % (where, int(v)))
            return ctypes.c_void_p(int(v))
        if not isinstance(v, np.ndarray):
            raise ArgumentError("%s: expected an emulator array (mod.array/zeros/empty), got %s" % (
                where, type(v).__name__))
        m = _VEC.match(pointee)
        elem, align = (m.group(1), _vec_align(m.group(1), int(m.group(2)))) if m else (pointee, None)
        want = _DT.get(elem)
        if want is not None and v.dtype != want:
            hint = " (bf16 data is passed as uint16 bit patterns)" if elem == "bf16" else ""
            raise ArgumentError("%s: array dtype is %s, the kernel expects %s* (numpy %s)%s" % (
                where, v.dtype, pointee, np.dtype(want), hint))
        if align is None:
            align = np.dtype(want).itemsize if want is not None else 1
        if not v.flags.c_contiguous:
            raise ArgumentError("%s: array must be C-contiguous" % where)
        ptr = v.__array_interface__["data"][0]
        reg = _region(ptr)
        if reg is None or (v.nbytes and ptr + v.nbytes > reg[1] + reg[2]):
            raise ArgumentError("%s: array is not in emulator memory; allocate it with mod.array/zeros/empty "
                                "(guard pages and traffic counting need that)" % where)
        if ptr % align:
            raise ArgumentError("%s: address is not %d-byte aligned, which a %s* must be" % (where, align, pointee))
        return ctypes.c_void_p(ptr)

    def __call__(self, grid, block, *args, smem=0, seed=None, cooperative=False):
        if len(args) != len(self.signature):
            raise ArgumentError("%s takes %d arguments (%s), got %d" % (
                self.name, len(self.signature), ", ".join(self.signature), len(args)))
        g, b = _dims(grid, "grid"), _dims(block, "block")
        vals = [self._pack(c, v, i) for i, (c, v) in enumerate(zip(self.signature, args))]
        argv = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        if seed is not None and not (isinstance(seed, (int, np.integer)) and 0 <= int(seed) < 2 ** 63):
            raise ArgumentError("seed must be a non-negative integer")
        opts = (ctypes.c_longlong * 3)(seed is not None, int(seed or 0), bool(cooperative))
        if not isinstance(smem, (int, np.integer)) or smem < 0:
            raise ArgumentError("smem must be a non-negative integer")
        rc = self._fn((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), int(smem), argv, opts)
        for t in list(_trackers):
            t._harvest(self.name)
        if rc:
            raise CudaCpuError(_symbolize(self.mod.lib.cuda_cpu_last_error().decode(errors="replace")))


def _dims(v, what):
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) and 0 <= int(x) < 2 ** 32 for x in t):
        raise ArgumentError("%s must be an int or a tuple of up to 3 ints, got %r" % (what, v))
    return tuple(int(x) for x in t) + (1,) * (3 - len(t))


def _symbolize(msg):
    """Replace "[pc lib.so+0x1234]" in an error message by the source line (addr2line, inlined frames)."""
    def repl(m):
        lib, off = m.group(1), m.group(2)
        try:
            out = subprocess.run(["addr2line", "-C", "-f", "-i", "-e", lib, "0x" + off], capture_output=True,
                                 text=True, timeout=30).stdout.split("\n")
        except (OSError, subprocess.SubprocessError):
            return m.group(0)
        frames = [(out[i], out[i + 1]) for i in range(0, len(out) - 1, 2) if ":" in out[i + 1]]
        frames = [(fn, loc.split(" (discriminator")[0]) for fn, loc in frames if not loc.startswith("??")]
        if not frames:
            return m.group(0)
        internal = (str(HEADER), str(RUNTIME), str(SHIM_INCLUDE))
        fn, loc = next(((fn, loc) for fn, loc in frames if not loc.startswith(internal)), frames[0])
        return " at %s (in %s)" % (loc, fn)

    return re.sub(r" \[pc (\S+)\+0x([0-9a-f]+)\]", repl, msg)


# ----------------------------------------------------------------------------------------------- modules
_CONFIG_KEYS = ("seed", "workers", "stack_kb", "poison", "timeout_ms", "max_coop_blocks")


class Module:
    """A built kernel file: its kernels (``mod[expr]``), the emulator configuration of its runtime, memory."""

    def __init__(self, so, kernels, source=None):
        self.path, self.source = Path(so), source
        self.lib = ctypes.CDLL(str(so))
        _declare_api(self.lib)
        self.lib.cuda_cpu_bind_core(_core().cuda_cpu_core())
        self.kernels = {k: Kernel(self, k) for k in kernels}
        self._by_norm = {_normalize_expr(k): v for k, v in self.kernels.items()}
        self.set(seed=_env_int("CUPYBN_EMULATOR_SEED", 1), timeout_ms=_env_int("CUPYBN_EMULATOR_TIMEOUT_MS", 60000),
                 workers=_env_int("CUPYBN_EMULATOR_WORKERS", 1))

    def __repr__(self):
        return "<emulator module %s: %s>" % (self.path.name, ", ".join(self.kernels))

    def __getitem__(self, expr):
        k = self.kernels.get(expr) or self._by_norm.get(_normalize_expr(expr))
        if k is None:
            raise KeyError("%r is not a kernel of this module (built: %s)" % (expr, ", ".join(self.kernels)))
        return k

    def __contains__(self, expr):
        return expr in self.kernels or _normalize_expr(expr) in self._by_norm

    # ---- configuration (persistent for this module: build() returns the same module for the same inputs)
    def set(self, **cfg):
        """seed (0: in order; else randomized), workers (OS threads for normal launches), timeout_ms (watchdog,
        0 = off), poison (0/1: fill __shared__ with 0xFF at block start), stack_kb (per thread),
        max_coop_blocks (cooperative launch limit)."""
        for k, v in cfg.items():
            if k not in _CONFIG_KEYS or self.lib.cuda_cpu_set(k.encode(), int(v)) != 0:
                raise KeyError("unknown emulator setting %r (known: %s)" % (k, ", ".join(_CONFIG_KEYS)))

    def get(self, key):
        """A setting (see set()) or counter: launches, blocks, resumes, run_ns; faults, guards_left and track
        belong to the process-wide memory core."""
        lib = _core() if key in ("faults", "guards_left", "track") else self.lib
        v = lib.cuda_cpu_get(key.encode())
        if v == -1 and key not in _CONFIG_KEYS:
            raise KeyError("unknown emulator setting or counter %r" % key)
        return v

    @contextlib.contextmanager
    def settings(self, **cfg):
        """Temporarily change settings: ``with mod.settings(timeout_ms=200): ...``."""
        old = {k: self.get(k) for k in cfg}
        self.set(**cfg)
        try:
            yield self
        finally:
            self.set(**old)

    def stats(self):
        """Counters since the last reset_stats(): launches, blocks, fiber resumes, run time, tracking faults."""
        return {k: self.get(k) for k in ("launches", "blocks", "resumes", "run_ns", "faults")}

    def reset_stats(self):
        self.lib.cuda_cpu_reset_stats()
        _core().cuda_cpu_reset_stats()

    # ---- memory (process-wide; these are the module-level functions)
    def empty(self, shape, dtype):
        return empty(shape, dtype, poison=bool(self.get("poison")))

    def zeros(self, shape, dtype):
        return zeros(shape, dtype)

    def array(self, src, dtype=None):
        return array(src, dtype)

    def track(self, **arrays):
        """Count the bytes of each named array touched per launch (page granularity) while the block runs:
        ``with mod.track(x=x, y=y) as t: ...``.  Launches of every module are counted."""
        return Traffic(arrays)


# ----------------------------------------------------------------------------------------------- traffic
_trackers = []


class Traffic:
    """Per-launch, page-granular global-memory footprint of emulator arrays.

    Each launch counts every page of a tracked array it touches once (first touch: read or write fault), so
    `passes(name)` is the number of times the launches streamed the array.  In cooperative launches, every
    grid.sync() starts a new phase whose touches count again (a re-read after a grid barrier is a new pass).
    """

    def __init__(self, arrays):
        self.arrays, self.log, self.ids, self.sizes = dict(arrays), [], {}, {}
        for n, a in self.arrays.items():
            reg = _region(a.__array_interface__["data"][0]) if isinstance(a, np.ndarray) else None
            if reg is None:
                raise ValueError("%s was not allocated by the emulator (mod.array/zeros/empty)" % n)
            self.ids[n], self.sizes[n] = reg[0], reg[2]

    def __enter__(self):
        core = _core()
        for rid in self.ids.values():
            core.cuda_cpu_track(rid, 1)
        core.cuda_cpu_set(b"track", 1)
        _trackers.append(self)
        return self

    def __exit__(self, *exc):
        core = _core()
        _trackers.remove(self)
        still = {rid for t in _trackers for rid in t.ids.values()}
        for rid in self.ids.values():
            if rid not in still:
                core.cuda_cpu_track(rid, 0)
        if not _trackers:
            core.cuda_cpu_set(b"track", 0)

    def _harvest(self, kernel):
        out = (ctypes.c_ulonglong * 4)()
        row = {"kernel": kernel}
        for n, rid in self.ids.items():
            _core().cuda_cpu_region_traffic(rid, out)
            row[n] = dict(read_pages=out[0], written_pages=out[1], pages=out[2], bytes=out[3])
        self.log.append(row)

    @property
    def launches(self):
        """Number of launches recorded inside the with-block."""
        return len(self.log)

    def bytes(self, name):
        """Bytes of `name` touched, summed over the recorded launches."""
        return sum(r[name]["bytes"] for r in self.log)

    def passes(self, name):
        """bytes(name) divided by the size of name's allocation."""
        return self.bytes(name) / max(1, self.sizes[name])

    def table(self, indent="   "):
        """One row per launch: bytes touched per array, as a multiple of its size, pages first read (R) or
        written (W)."""
        names = list(self.arrays)
        lines = [indent + "%-34s" % "launch" + "".join("%22s" % ("%s (%d B)" % (n, self.sizes[n])) for n in names)]
        for r in self.log:
            cells = []
            for n in names:
                t = r[n]
                cells.append("%22s" % ("%d %.2fx R%d W%d" % (t["bytes"], t["bytes"] / max(1, self.sizes[n]),
                                                              t["read_pages"], t["written_pages"])
                                       if t["pages"] else "-"))
            lines.append(indent + "%-34s" % r["kernel"][:34] + "".join(cells))
        return "\n".join(lines)
