"""GPU benchmark: cupybn's BatchNorm eval and training forward against torch and cuDNN.

    python bench/gpu.py                       # default shapes, every dtype, eval and train
    python bench/gpu.py --dtypes float16 --shapes 32x64x56x56 256x1024 --repeat 200 --modes train

For each shape and dtype it times, with CUDA events on one stream (median of --repeat runs after
warm-up):

* ``cupybn(torch)`` -- ``cupybn._cuda.batch_norm_forward`` on CUDA torch tensors (DLPack, torch's
  stream: the path ``cupybn.batch_norm`` takes for torch input);
* ``cupybn(cupy)``  -- the same on CuPy arrays (float16/32/64: CuPy has no bfloat16);
* ``torch cudnn`` / ``torch native`` -- ``torch.nn.functional.batch_norm(training=False)`` with
  cuDNN enabled / disabled;
* ``cupyx.cudnn``   -- ``cupyx.cudnn.batch_normalization_forward_inference`` where this CuPy still
  ships it (removed in CuPy 14).

Training rows (``train``) time the training forward with running statistics (momentum 0.1,
updated in place) and, for cupybn, a device-side ``num_batches_tracked``; torch's rows call
``batch_norm(training=True)`` with running statistics; cupyx.cudnn is eval only.

It prints the time, the effective bandwidth (eval: x read once + y written once; train: x read
twice + y written once -- the minimum for a two-pass design; parameters ignored) and each
baseline's time divided by cupybn's (> 1: cupybn is faster). Parameters are
float32 for float16/bfloat16/float32 input (torch's mixed-precision layout) and float64 for
float64 input.

Needs a CUDA GPU with CuPy (and torch with CUDA for the torch rows); says so and exits with
status 2 when there is none.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

DEFAULT_SHAPES = ["32x64x112x112", "64x256x56x56", "128x512x14x14", "256x2048x7x7", "4096x1024", "8x32x16x64x64",
                  "7x3x223x221"]
DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _no_gpu(reason: str) -> int:
    print(f"bench/gpu.py needs a CUDA GPU: {reason}. Nothing was measured.", file=sys.stderr)
    return 2


def _time(fn, stream_ctx, repeat: int, warmup: int = 5):
    """Median milliseconds of fn() between CUDA events recorded on the stream stream_ctx() makes current."""
    import cupy

    with stream_ctx():
        for _ in range(warmup):
            fn()
        stream = cupy.cuda.get_current_stream()
        times = []
        for _ in range(repeat):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxCx... shapes")
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    args = parser.parse_args(argv)

    try:
        import cupy
    except ImportError:
        return _no_gpu("CuPy is not installed")
    try:
        if not cupy.cuda.is_available():
            return _no_gpu("cupy.cuda.is_available() is False")
    except Exception as exc:
        return _no_gpu(f"CuPy cannot reach a device ({exc})")
    try:
        import torch

        have_torch = torch.cuda.is_available()
    except ImportError:
        torch, have_torch = None, False

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from cupybn import _cuda

    try:
        import cupyx.cudnn as cx_cudnn
        from cupy_backends.cuda.libs import cudnn as libcudnn
        cudnn_mode = libcudnn.CUDNN_BATCHNORM_SPATIAL
    except Exception as exc:  # CuPy 14 dropped cupyx.cudnn; older ones need the cuDNN library
        cx_cudnn, cudnn_note = None, f"cupyx.cudnn unavailable ({type(exc).__name__}: {exc})"
    else:
        cudnn_note = ""

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device: {name} ({dev.attributes['MultiProcessorCount']} SMs); cupy {cupy.__version__}; "
          f"torch {torch.__version__ if torch else 'missing'}; median of {args.repeat} runs")
    if cudnn_note:
        print(cudnn_note)
    header = (f"{'shape':>18} {'dtype':>8} {'mode':>5} | {'cupybn(torch)':>20} | {'cupybn(cupy)':>13} | "
              f"{'torch cudnn':>15} | {'torch native':>15} | {'cupyx.cudnn':>15}")
    print(header)
    print("-" * len(header))

    null_ctx = _NullContext
    for shape_text in args.shapes:
        shape = tuple(int(s) for s in shape_text.lower().split("x"))
        c = shape[1]
        for dtype, mode in ((d, m) for d in args.dtypes for m in args.modes):
            train = mode == "train"
            p_dtype = "float64" if dtype == "float64" else "float32"
            nbytes = (3 if train else 2) * _numel(shape) * (
                2 if dtype in ("float16", "bfloat16") else 4 if dtype == "float32" else 8)
            row = {}
            if have_torch:
                tx = torch.randn(shape, device="cuda", dtype=torch.float32).to(getattr(torch, dtype))
                tp = [torch.randn(c, device="cuda", dtype=getattr(torch, p_dtype)) for _ in range(4)]
                tp[1] = tp[1].abs() + 0.5

                def torch_stream_ctx():  # torch's current stream as CuPy's (what cupybn itself does)
                    return _cuda.interop.input_stream(tx)

                tnbt = torch.zeros((), dtype=torch.int64, device="cuda")
                row["cupybn(torch)"] = _time(lambda: _cuda.batch_norm_forward(
                    tx, *tp, train, 0.1, args.eps, num_batches_tracked=tnbt), torch_stream_ctx, args.repeat)
                for label, enabled in (("torch cudnn", True), ("torch native", False)):
                    with torch.backends.cudnn.flags(enabled=enabled):
                        row[label] = _time(lambda: torch.nn.functional.batch_norm(
                            tx, tp[0], tp[1], tp[2], tp[3], training=train, eps=args.eps), torch_stream_ctx,
                            args.repeat)
            if dtype != "bfloat16":
                cx = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(dtype)
                cp = [cupy.random.standard_normal(c).astype(p_dtype) for _ in range(4)]
                cp[1] = cupy.abs(cp[1]) + 0.5
                cnbt = cupy.zeros((), dtype=cupy.int64)
                row["cupybn(cupy)"] = _time(lambda: _cuda.batch_norm_forward(
                    cx, *cp, train, 0.1, args.eps, num_batches_tracked=cnbt), null_ctx, args.repeat)
                if cx_cudnn is not None and len(shape) in (4, 5) and not train:
                    def run_cudnn():
                        return cx_cudnn.batch_normalization_forward_inference(
                            cx, cp[2], cp[3], cp[0], cp[1], args.eps, len(shape) == 4, cudnn_mode)
                    try:
                        row["cupyx.cudnn"] = _time(run_cudnn, null_ctx, args.repeat)
                    except Exception as exc:  # e.g. cuDNN refuses a layout
                        print(f"  cupyx.cudnn failed for {shape_text} {dtype}: {exc}")
            ours = row.get("cupybn(torch)", row.get("cupybn(cupy)"))

            def cell(key, width, base=False):
                t = row.get(key)
                if t is None:
                    return f"{'-':>{width}}"
                gbs = nbytes / (t * 1e-3) / 1e9
                if base:
                    return f"{t * 1e3:7.1f}us {gbs:7.0f}GB/s".rjust(width)
                return f"{t * 1e3:6.1f}us x{t / ours:4.2f}".rjust(width)

            print(f"{shape_text:>18} {dtype:>8} {mode:>5} | {cell('cupybn(torch)', 20, True)} | "
                  f"{cell('cupybn(cupy)', 13) if 'cupybn(torch)' in row else cell('cupybn(cupy)', 13, True)} | "
                  f"{cell('torch cudnn', 15)} | {cell('torch native', 15)} | {cell('cupyx.cudnn', 15)}")
    print("\nus: median time per call between events on the stream (host overhead shows when the GPU idles);\n"
          "GB/s: (x read + y written) / time, x read twice in train;\n"
          "x<r>: that column's time / cupybn's (> 1: cupybn is faster).")
    return 0


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
