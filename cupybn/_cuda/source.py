"""Where the CUDA sources live at run time, and the NVRTC options every compile of them uses.

The kernels are plain ``.cu`` / ``.cuh`` files in the top-level ``kernels/`` folder of the
repository. An installed wheel carries them as ``cupybn/kernels/`` (pyproject force-includes the
folder); an editable install or a source checkout finds them at ``<repo>/kernels/``.

Both the CuPy launcher and the NVRTC compile gate (tests/test_cuda_compile_gate.py) build their
NVRTC input with :func:`program_text` and :func:`nvrtc_options`, so the gate checks exactly what
runs.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../cupybn
_MARKER = "cupybn.cuh"


def kernel_dir() -> Path:
    """The folder that holds ``cupybn.cuh`` and the ``.cu`` files (wheel layout first)."""
    for candidate in (_PACKAGE_DIR / "kernels", _PACKAGE_DIR.parent / "kernels"):
        if (candidate / _MARKER).is_file():
            return candidate
    raise FileNotFoundError(
        f"cupybn's CUDA sources were not found: looked for {_MARKER} in {_PACKAGE_DIR / 'kernels'} "
        f"(installed wheel) and {_PACKAGE_DIR.parent / 'kernels'} (source checkout)")


def source_digest(directory: Path | None = None) -> str:
    """SHA-256 over every ``.cu`` / ``.cuh`` file of ``directory`` (names and contents).

    CuPy caches compiled modules by the text it is given; the text names the files by
    ``#include``, so the digest goes into it to make an edited header miss the cache.
    """
    directory = Path(directory) if directory is not None else kernel_dir()
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in (".cu", ".cuh") and path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def program_text(source: str, directory: Path | None = None) -> str:
    """The NVRTC program for ``source`` (e.g. ``"batch_norm.cu"``): an ``#include`` of the file.

    Including (rather than pasting) keeps NVRTC's diagnostics pointing at the real file and
    line; the digest comment keys CuPy's cache on the contents of every kernel file.
    """
    directory = Path(directory) if directory is not None else kernel_dir()
    return f'// cupybn kernels {source_digest(directory)}\n#include "{source}"\n'


@functools.lru_cache(maxsize=1)
def cuda_include_dir() -> str | None:
    """The CUDA runtime headers (cuda_fp16.h, cuda_bf16.h) NVRTC needs, found by cuda.pathfinder.

    ``None`` when cuda.pathfinder is missing or finds nothing; CuPy then falls back to its own
    CUDA path, and the compile gate fails with NVRTC's "cannot open source file" message.
    """
    try:
        import cuda.pathfinder as pathfinder
    except ImportError:
        return None
    try:
        return pathfinder.find_nvidia_header_directory("cudart")
    except Exception:  # an unsupported platform or a broken install: let NVRTC report it
        return None


def nvrtc_options(directory: Path | None = None) -> tuple[str, ...]:
    """Options shared by every compile of the kernels (the launcher adds the architecture).

    ``-std=c++17``; the kernel folder (for ``#include "cupybn.cuh"``) and the CUDA headers on the
    include path. CuPy appends ``-ftz=true`` on its own; the kernels are written so that it
    changes nothing (see the IEEE helpers in cupybn.cuh), and the compile gate compiles with it.
    """
    directory = Path(directory) if directory is not None else kernel_dir()
    options = ["-std=c++17", f"-I{directory}"]
    include = cuda_include_dir()
    if include:
        options.append(f"-I{include}")
    return tuple(options)
