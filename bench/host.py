"""GPU-path host time without a GPU: cupybn's per-call Python cost next to torch's own per-call cost.

Runs the real GPU path -- dispatch, prepared call, planner, launch objects, argument binding and
marshalling -- with CuPy replaced by host memory and the kernel call by a record of it
(``tests/fake_cupy.py``), so it runs on any machine, CI included. Each case is timed per call
(median of alternating bursts) next to torch's own per-call CPU time for the same operation on
a tiny CPU tensor, measured in the same process: torch's host cost per op is the budget that
ours must fit, with room left for CuPy's own few microseconds per kernel launch (not counted).
The last line is ``worst host ratio cupybn/torch: X.XX`` (target <= 1.0).

    python bench/host.py [--repeat 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fake_cupy  # noqa: E402

import cupybn  # noqa: E402
from cupybn import native  # noqa: E402
from cupybn._cuda import interop  # noqa: E402


def median_us(fns, repeat: int, burst: int = 200) -> list[float]:
    """Median microseconds per call of each function, taking turns in bursts of ``burst`` calls."""
    times = [[] for _ in fns]
    for r in range(repeat):
        order = list(enumerate(fns)) if r % 2 == 0 else list(enumerate(fns))[::-1]
        for i, fn in order:
            fn()
            start = time.perf_counter()
            for _ in range(burst):
                fn()
            times[i].append((time.perf_counter() - start) / burst)
    return [statistics.median(t) * 1e6 for t in times]


def cases(fc, torch, tf):
    """``(name, shape, cupybn call, torch call)`` per case; shapes tiny and typical."""
    rng = np.random.default_rng(0)
    out = []
    for shape in ((2, 8, 4, 4), (32, 64, 28, 28)):
        c = shape[1]
        xn = rng.standard_normal(shape).astype(np.float32)
        x, dy = fc.asarray(xn), fc.asarray(xn)
        rm, rv, w, b = (fc.asarray(v) for v in (np.zeros(c, np.float32), np.ones(c, np.float32),
                                                 np.ones(c, np.float32), np.zeros(c, np.float32)))
        _, sm, si = native.native_batch_norm(x, w, b, rm, rv, True)
        t = torch.zeros((2, 8, 4, 4))  # torch's budget: the same op on a tiny CPU tensor
        tc = [torch.zeros(8), torch.ones(8), torch.ones(8), torch.zeros(8)]
        tsm, tsi = torch.zeros(8), torch.ones(8)
        out += [
            ("BatchNorm train", shape, lambda x=x, rm=rm, rv=rv, w=w, b=b: cupybn.batch_norm(x, rm, rv, w, b, True),
             lambda: tf.batch_norm(t, *tc, True)),
            ("BatchNorm eval", shape, lambda x=x, rm=rm, rv=rv, w=w, b=b: cupybn.batch_norm(x, rm, rv, w, b, False),
             lambda: tf.batch_norm(t, *tc, False)),
            ("BatchNorm backward", shape,
             lambda x=x, dy=dy, w=w, rm=rm, rv=rv, sm=sm, si=si: native.batch_norm_backward(dy, x, w, rm, rv, sm, si, True),
             lambda: torch.ops.aten.native_batch_norm_backward(t, t, tc[2], tc[0], tc[1], tsm, tsi, True, 1e-5,
                                                               [True, True, True])),
            ("GroupNorm", shape, lambda x=x, w=w, b=b: cupybn.group_norm(x, 4, w, b),
             lambda: tf.group_norm(t, 4, tc[2], tc[3])),
            ("InstanceNorm", shape, lambda x=x: cupybn.instance_norm(x), lambda: tf.instance_norm(t)),
        ]
    for shape in ((2, 8, 16), (64, 128, 768)):
        k = shape[-1]
        xn = rng.standard_normal(shape).astype(np.float32)
        x, dy = fc.asarray(xn), fc.asarray(xn)
        w, b = fc.asarray(np.ones(k, np.float32)), fc.asarray(np.zeros(k, np.float32))
        _, m, r = native.native_layer_norm(x, (k,), w, b)
        t = torch.zeros((2, 8, 16))
        tw, tb = torch.ones(16), torch.zeros(16)
        _, tm, tr = torch.ops.aten.native_layer_norm(t, [16], tw, tb, 1e-5)
        out += [
            ("LayerNorm", shape, lambda x=x, w=w, b=b, k=k: cupybn.layer_norm(x, (k,), w, b),
             lambda: tf.layer_norm(t, (16,), tw, tb)),
            ("LayerNorm backward", shape,
             lambda x=x, dy=dy, m=m, r=r, w=w, b=b, k=k: native.layer_norm_backward(dy, x, (k,), m, r, w, b),
             lambda: torch.ops.aten.native_layer_norm_backward(t, t, [16], tm, tr, tw, tb, [True, True, True])),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError:
        raise SystemExit("bench/host.py compares with torch: pip install torch==2.13.0")
    torch.set_num_threads(1)
    interop.device_id = lambda x: 0  # every host "device array" lives on device 0
    print(f"torch {torch.__version__} (1 thread): per-call host time, microseconds (median)")
    print(f"{'op':20s} {'shape':18s} {'cupybn us':>10s} {'torch us':>9s} {'ratio':>6s} {'launches':>8s}")
    worst = 0.0
    with fake_cupy.installed() as launcher:
        for name, shape, ours, theirs in cases(fake_cupy, torch, tf):
            before = launcher.launches
            ours()
            launches = launcher.launches - before
            us, them = median_us([ours, theirs], args.repeat)
            ratio = us / them
            worst = max(worst, ratio)
            print(f"{name:20s} {str(shape):18s} {us:10.1f} {them:9.1f} {ratio:6.2f} {launches:8d}")
    print(f"worst host ratio cupybn/torch: {worst:.2f}")


if __name__ == "__main__":
    main()
