"""``python -m cupybn``: train a BatchNorm2d on a stream of image-like batches and watch it learn.

The stream has known per-channel statistics (like an RGB dataset's mean and std). The layer's
running statistics converge to them; in eval mode the layer then standardizes new batches with
what it learned. When torch is installed the same sequence runs through ``torch.nn.BatchNorm2d``
and the two are compared. ``--device cuda`` runs the same demo on CuPy arrays (GPU kernels).
"""
from __future__ import annotations

import argparse

import numpy as np

import cupybn

TRUE_MEAN = np.array([124.0, 116.0, 104.0])  # an RGB dataset's channel means (0..255 scale)
TRUE_STD = np.array([58.0, 57.0, 57.5])


def image_batches(rng, steps: int, batch: int, size: int):
    """Batches ``(batch, 3, size, size)`` float32 with the channel statistics above."""
    for _ in range(steps):
        noise = rng.standard_normal((batch, 3, size, size))
        yield (noise * TRUE_STD[:, None, None] + TRUE_MEAN[:, None, None]).astype(np.float32)


def fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):8.3f}" for v in np.asarray(values).ravel()) + "]"


def to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cupybn", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training batches (default 200)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--device", default="cpu", help="'cpu' (NumPy, default) or 'cuda' (CuPy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    xp = np
    if args.device != "cpu":
        import cupy as xp  # noqa: F811 - the GPU flavour of the same demo

    rng = np.random.default_rng(args.seed)
    batches = list(image_batches(rng, args.steps, args.batch, args.size))
    bn = cupybn.BatchNorm2d(3, momentum=0.1, device=args.device)
    print(f"cupybn {cupybn.__version__}: BatchNorm2d(3) trained on {args.steps} batches of "
          f"{(args.batch, 3, args.size, args.size)} float32 image-like data")
    print(f"path: {cupybn.path_for(xp.asarray(batches[0]))} "
          f"({'NumPy arrays on the CPU' if xp is np else 'CuPy arrays, CUDA kernels'})")
    print(f"\n{'step':>5s}  {'running_mean':38s} {'sqrt(running_var)':38s}")
    report = {1, 5, 20, 50, args.steps}
    for step, x in enumerate(batches, 1):
        y = bn(xp.asarray(x))
        if step in report:
            print(f"{step:5d}  {fmt(to_numpy(bn.running_mean))} {fmt(np.sqrt(to_numpy(bn.running_var)))}")
    print(f"{'true':>5s}  {fmt(TRUE_MEAN)} {fmt(TRUE_STD)}")
    mean_err = np.abs(to_numpy(bn.running_mean) - TRUE_MEAN).max()
    std_err = np.abs(np.sqrt(to_numpy(bn.running_var)) - TRUE_STD).max()
    print(f"largest gap to the true statistics: mean {mean_err:.3f}, std {std_err:.3f} "
          f"(num_batches_tracked = {int(to_numpy(bn.num_batches_tracked))})")

    bn.eval()
    test = next(image_batches(np.random.default_rng(args.seed + 1), 1, args.batch, args.size))
    y = to_numpy(bn(xp.asarray(test)))
    print(f"\neval on a new batch: per-channel output mean {fmt(y.mean(axis=(0, 2, 3)))}, "
          f"std {fmt(y.std(axis=(0, 2, 3)))} (≈ 0 and ≈ 1)")

    try:
        import torch
    except ImportError:
        print("\ntorch is not installed: skipping the comparison with torch.nn.BatchNorm2d")
        return 0
    ref = torch.nn.BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        for x in batches:
            ref(torch.from_numpy(x))
        ref.eval()
        y_ref = ref(torch.from_numpy(test)).numpy()
    print(f"\ntorch {torch.__version__}, same sequence through torch.nn.BatchNorm2d:")
    print(f"  max |running_mean - torch| = {np.abs(to_numpy(bn.running_mean) - ref.running_mean.numpy()).max():.2e}")
    print(f"  max |running_var  - torch| = {np.abs(to_numpy(bn.running_var) - ref.running_var.numpy()).max():.2e}")
    print(f"  max |eval output  - torch| = {np.abs(y - y_ref).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
