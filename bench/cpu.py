"""CPU benchmark: cupybn's reference path on NumPy input against torch.nn.functional.batch_norm.

BatchNorm training forward, float32, on the shapes of issue 2. Both run in the same process on
the same data, taking turns (a few calls each, see ``median_ms``) so that a busy machine slows
both alike; each time is the median of ``3 * --repeat`` calls. torch uses its default intra-op
threads, cupybn its block thread pool. The last line printed is ``worst ratio cupybn/torch: X.XX``.

    python bench/cpu.py [--repeat 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import cupybn

SHAPES = [(32, 64, 56, 56), (256, 256, 14, 14), (8, 3, 224, 224), (4096, 512)]


def median_ms(fns, repeat: int, burst: int = 3, settle_s: float = 0.01) -> list[float]:
    """Median milliseconds of each function, the functions taking turns ``repeat`` times (in
    reverse order every other round).

    Each turn first calls the function untimed for ``settle_s`` (at least once), then times
    ``burst`` calls. The untimed calls outlast the other library's leftovers: torch's OpenMP
    workers keep spinning for 4-8 ms after its last call (measured here), and a call that starts
    then shares the second core with them. Taking turns call by call would charge that to
    whichever library runs next; sleeping it out instead lets the idle virtual CPUs halt, and the
    next call pays for waking them.
    """
    times = [[] for _ in fns]
    turns = list(zip(fns, times))
    for r in range(repeat):
        # Every other round in reverse order, so that neither library always runs right after
        # the other (cupybn measured ~3% slower right after torch's turn than after its own).
        for fn, t in (turns if r % 2 == 0 else turns[::-1]):
            start = time.perf_counter()
            fn()
            while time.perf_counter() - start < settle_s:
                fn()
            for _ in range(burst):
                start = time.perf_counter()
                fn()
                t.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError:
        raise SystemExit("bench/cpu.py compares with torch: pip install torch==2.13.0")

    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    print(f"{'op':12s} {'shape':20s} {'cupybn ms':>10s} {'torch ms':>10s} {'ratio':>7s} {'GB/s':>7s}")
    worst = 0.0
    for shape in SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        c = shape[1]
        mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)
        weight, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
        tx = torch.from_numpy(x)
        tmean, tvar = torch.zeros(c), torch.ones(c)
        tweight, tbias = torch.ones(c), torch.zeros(c)
        ours, theirs = median_ms(
            [lambda: cupybn.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5),
             lambda: tf.batch_norm(tx, tmean, tvar, tweight, tbias, True, 0.1, 1e-5)], args.repeat)
        ratio = ours / theirs
        worst = max(worst, ratio)
        # DRAM bytes a fused implementation must move at least: read x twice, write y once.
        gbs = 3 * x.nbytes / (ours * 1e-3) / 1e9
        op = "BatchNorm1d" if len(shape) == 2 else "BatchNorm2d"
        print(f"{op:12s} {str(shape):20s} {ours:10.2f} {theirs:10.2f} {ratio:7.2f} {gbs:7.1f}")
    print(f"worst ratio cupybn/torch: {worst:.2f}")


if __name__ == "__main__":
    main()
