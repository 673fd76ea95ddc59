"""Memory traffic of cupybn's GPU kernels, measured in the CUDA emulator (no GPU needed).

    python bench/traffic.py           # a table
    python bench/traffic.py --json    # one JSON object per case, one a line

Each case plans the op with the GPU path's planner (``cupybn._cuda.planner``), runs the launches
on the CPU emulator (``tests/emulator``) and counts, per launch and page, the bytes of x and y the
launches touch (``emulator.Module.track``). Columns:

* ``launches`` -- kernel launches of one forward call;
* ``x_passes`` -- bytes of x touched, summed over the launches, over the size of x (1 = x streamed
  once); ``y_passes`` -- the same for y;
* backward rows (``BatchNorm2d backward``, ``LayerNorm backward``: training backward from saved
  statistics, every gradient asked for): ``dy_passes``, ``x_passes``, ``dx_passes`` -- the same for dy, x and dx;
* ``grid`` -- grid sizes of the launches (statistics launch: channels x blocks per channel).

LayerNorm / GroupNorm / InstanceNorm run on kernels/fused_groups.cu (planner.plan_groups_forward):
groups that fit on chip are read once and written once in one launch.

The plans are made for an H100 (132 SMs), the default ``planner.DeviceInfo``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

import emulator  # noqa: E402
from cupybn._cuda import planner  # noqa: E402
from emulator.launcher import EmulatorLauncher  # noqa: E402

CASES = [
    ("BatchNorm2d train", (8, 64, 28, 28), "float32"),
    ("BatchNorm2d train", (4, 3, 64, 64), "float32"),
    ("BatchNorm2d train", (8, 64, 28, 28), "float16"),
    ("BatchNorm2d train", (4, 3, 64, 64), "float16"),
    ("BatchNorm2d eval", (8, 64, 28, 28), "float32"),
    ("BatchNorm2d eval", (4, 3, 64, 64), "float32"),
    ("BatchNorm2d eval", (8, 64, 28, 28), "float16"),
    ("BatchNorm2d eval", (4, 3, 64, 64), "float16"),
    ("BatchNorm1d train", (256, 32), "float32"),
    ("BatchNorm1d train", (16, 32, 100), "float32"),
    ("LayerNorm", (4096, 768), "float32"),
    ("LayerNorm", (4096, 768), "float16"),
    ("LayerNorm", (64, 8192), "float32"),
    ("LayerNorm", (64, 8192), "float16"),
    ("GroupNorm G=32", (8, 64, 28, 28), "float32"),
    ("GroupNorm G=32", (8, 64, 28, 28), "float16"),
    ("InstanceNorm2d", (8, 16, 32, 32), "float32"),
    ("InstanceNorm2d", (8, 16, 32, 32), "float16"),
    ("BatchNorm2d backward", (8, 64, 28, 28), "float32"),
    ("BatchNorm2d backward", (4, 3, 64, 64), "float32"),
    ("BatchNorm2d backward", (8, 64, 28, 28), "float16"),
    ("BatchNorm2d backward", (4, 3, 64, 64), "float16"),
    ("LayerNorm backward", (512, 768), "float32"),
    ("LayerNorm backward", (512, 768), "float16"),
]

BACKWARD_KEYS = ("op", "shape", "dtype", "launches", "dy_passes", "x_passes", "dx_passes")
FORWARD_KEYS = ("op", "shape", "dtype", "launches", "x_passes", "y_passes")


def run_backward_case(launcher: EmulatorLauncher, op: str, shape, dtype: str) -> dict:
    """BatchNorm training backward from saved statistics, every gradient asked for
    (planner.plan_batch_norm_backward): the reduction, then dx."""
    rng = np.random.default_rng(0)
    c = shape[1]
    acc = planner.accumulation_dtype(dtype)
    x = emulator.array((rng.standard_normal(shape) * 2 + 1).astype(dtype))
    dy = emulator.array(rng.standard_normal(shape).astype(dtype))
    dx = emulator.empty(shape, dtype)
    vec = lambda v, d=np.float32: planner.Operand.of(emulator.array(np.asarray(v, d)))  # noqa: E731
    mean, invstd = vec(np.ones(c), acc), vec(np.full(c, 0.5), acc)
    weight = vec(rng.standard_normal(c))
    grads = [planner.Operand.of(emulator.empty((c,), np.float32)) for _ in range(2)]
    sums = planner.Operand.of(emulator.empty((3 * c,), acc))
    plan = planner.plan_batch_norm_backward(planner.Operand.of(dy), planner.Operand.of(x), planner.Operand.of(dx),
                                            mean, invstd, True, weight, grads[0], grads[1], sums, 1e-5,
                                            device=launcher.device_info())
    mod = launcher.module(plan[0].source)
    with mod.track(dy=dy, x=x, dx=dx) as t:
        launcher.launch(plan)
    return {"op": op, "shape": list(shape), "dtype": dtype, "launches": t.launches,
            "dy_passes": round(t.passes("dy"), 4), "x_passes": round(t.passes("x"), 4),
            "dx_passes": round(t.passes("dx"), 4),
            "grid": [launch.grid[0] * launch.grid[1] for launch in plan],
            "block": [math.prod(launch.block) for launch in plan]}


def run_layer_norm_backward_case(launcher: EmulatorLauncher, op: str, shape, dtype: str) -> dict:
    """LayerNorm backward over the last axis from saved statistics, every gradient asked for
    (planner.plan_groups_backward): per-row sums, dx, then the two-stage dgamma / dbeta."""
    rng = np.random.default_rng(0)
    rows, row = shape
    acc = planner.accumulation_dtype(dtype)
    x = emulator.array((rng.standard_normal(shape) * 2 + 1).astype(dtype))
    dy = emulator.array(rng.standard_normal(shape).astype(dtype))
    dx = emulator.empty(shape, dtype)
    layout = planner.layer_norm_layout(shape, (row,))
    device = launcher.device_info()
    vec = lambda v, d=np.float32: planner.Operand.of(emulator.array(np.asarray(v, d)))  # noqa: E731
    mean, rstd = vec(np.ones(rows), acc), vec(np.full(rows, 0.5), acc)
    weight = vec(rng.standard_normal(row))
    grads = [planner.Operand.of(emulator.empty((row,), np.float32)) for _ in range(2)]
    sums = planner.Operand.of(emulator.empty((2 * rows,), acc))
    ws = planner.Operand.of(emulator.empty((planner.groups_backward_workspace(layout, device),), acc))
    plan = planner.plan_groups_backward(planner.Operand.of(dy), planner.Operand.of(x), planner.Operand.of(dx),
                                        layout, mean, rstd, weight, grads[0], grads[1], sums, ws, device=device)
    mod = launcher.module(plan[0].source)
    with mod.track(dy=dy, x=x, dx=dx) as t:
        launcher.launch(plan)
    return {"op": op, "shape": list(shape), "dtype": dtype, "launches": t.launches,
            "dy_passes": round(t.passes("dy"), 4), "x_passes": round(t.passes("x"), 4),
            "dx_passes": round(t.passes("dx"), 4),
            "grid": [launch.grid[0] * launch.grid[1] for launch in plan],
            "block": [math.prod(launch.block) for launch in plan]}


def run_case(launcher: EmulatorLauncher, op: str, shape, dtype: str) -> dict:
    if op == "LayerNorm backward":
        return run_layer_norm_backward_case(launcher, op, shape, dtype)
    if op.endswith("backward"):
        return run_backward_case(launcher, op, shape, dtype)
    rng = np.random.default_rng(0)
    c = shape[1]
    acc = planner.accumulation_dtype(dtype)
    x = emulator.array((rng.standard_normal(shape) * 2 + 1).astype(dtype))
    y = emulator.empty(shape, dtype)
    vec = lambda v: planner.Operand.of(emulator.array(np.asarray(v, np.float32)))  # noqa: E731
    weight, bias = vec(rng.standard_normal(c)), vec(rng.standard_normal(c))
    running_mean, running_var = vec(np.zeros(c)), vec(np.ones(c))
    X, Y = planner.Operand.of(x), planner.Operand.of(y)
    device = launcher.device_info()
    if op == "LayerNorm" or op.startswith(("GroupNorm", "InstanceNorm")):
        plan = _groups_plan(op, shape, dtype, X, Y, rng, device)
    elif op.endswith("train"):
        saved = [planner.Operand.of(emulator.empty((c,), acc)) for _ in range(3)]
        nbt = planner.Operand.of(emulator.zeros((), np.int64))
        plan = planner.plan_batch_norm_train_forward(X, Y, saved[0], saved[1], running_mean, running_var, nbt,
                                                     weight, bias, 0.1, 1e-5, device=device, save_offset=saved[2])
    else:
        plan = planner.plan_batch_norm_eval_forward(X, Y, running_mean, running_var, weight, bias, 1e-5,
                                                    device=device)
    mod = launcher.module(plan[0].source)
    with mod.track(x=x, y=y) as t:
        launcher.launch(plan)
    return {"op": op, "shape": list(shape), "dtype": dtype, "launches": t.launches,
            "x_passes": round(t.passes("x"), 4), "y_passes": round(t.passes("y"), 4),
            "grid": [launch.grid[0] * launch.grid[1] for launch in plan],
            "block": [math.prod(launch.block) for launch in plan]}


def _groups_plan(op, shape, dtype, X, Y, rng, device):
    """Layer norm (elementwise affine over the last dimension), group norm (G from the name,
    per-channel affine), instance norm (running statistics, per-channel affine)."""
    vec = lambda v: planner.Operand.of(emulator.array(np.asarray(v, np.float32)))  # noqa: E731
    running = {}
    if op == "LayerNorm":
        layout, p = planner.layer_norm_layout(shape, shape[-1:]), shape[-1]
    elif op.startswith("GroupNorm"):
        layout, p = planner.group_norm_layout(shape, int(op.split("G=")[1])), shape[1]
    else:
        layout, p = planner.instance_norm_layout(shape), shape[1]
        running = dict(running_mean=vec(np.zeros(p)), running_var=vec(np.ones(p)))
    acc = planner.accumulation_dtype(dtype)
    save = tuple(planner.Operand.of(emulator.empty((layout.groups,), acc)) for _ in range(3))
    return planner.plan_groups_forward(X, Y, layout, vec(rng.standard_normal(p)), vec(rng.standard_normal(p)),
                                       1e-5, op.startswith("InstanceNorm"), save=save, device=device, **running)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per case, one a line")
    args = parser.parse_args(argv)
    launcher = EmulatorLauncher()
    start = time.perf_counter()
    rows = [run_case(launcher, *case) for case in CASES]
    if args.json:
        for row in rows:
            keys = BACKWARD_KEYS if "dy_passes" in row else FORWARD_KEYS
            print(json.dumps({k: row[k] for k in keys}))
        return 0
    print(f"{'op':<20}{'shape':<18}{'dtype':<9}{'launches':>9}{'x_passes':>10}{'y_passes':>10}   grid (blocks)")
    for r in rows:
        if "dy_passes" in r:
            continue
        print(f"{r['op']:<20}{'x'.join(map(str, r['shape'])):<18}{r['dtype']:<9}{r['launches']:>9}"
              f"{r['x_passes']:>10.3g}{r['y_passes']:>10.3g}   {r['grid']} x {r['block']} threads")
    print(f"\n{'op':<22}{'shape':<16}{'dtype':<9}{'launches':>9}{'dy_passes':>10}{'x_passes':>10}{'dx_passes':>10}"
          "   grid (blocks)")
    for r in rows:
        if "dy_passes" in r:
            print(f"{r['op']:<22}{'x'.join(map(str, r['shape'])):<16}{r['dtype']:<9}{r['launches']:>9}"
                  f"{r['dy_passes']:>10.3g}{r['x_passes']:>10.3g}{r['dx_passes']:>10.3g}   {r['grid']} x {r['block']} threads")
    print(f"({time.perf_counter() - start:.1f} s in the emulator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
