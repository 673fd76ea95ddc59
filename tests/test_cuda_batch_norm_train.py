"""BatchNorm training forward on the GPU path, executed on the CPU through the CUDA emulator.

planner -> emulator launcher -> kernels/moments.cu (statistics + fused running-stat update) and
kernels/batch_norm.cu (normalize, kInvStd), compared with the float64 oracle (tests/oracle.py):

* every dtype x layouts (NC, NCL, NCHW, NCDHW) x shapes with one block per channel, many blocks
  per channel (forced with the planner's ``splits``), partial vectors and row tails;
* running statistics of every float dtype, momentum and ``momentum=None`` over several steps,
  ``num_batches_tracked`` on the device;
* bitwise repeatability of statistics, running statistics and output across emulator schedules;
* the workspace protocol (counters zero after every launch, reused by the next one);
* edge cases: spatial size 1, batch 1, empty batch, eps = 0, mean 1e4 / std 1e-2, NaN / Inf,
  64-bit offsets (a huge logical tensor of which only the far end is real memory);
* the layers and ``cupybn.batch_norm`` on the (emulated) GPU path against the CPU path.
"""
from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

import oracle  # noqa: E402
from cupybn._cuda import planner  # noqa: E402
from test_cuda_batch_norm_eval import (EPS, TINY, alloc, alloc_empty, get_launcher, quantize,  # noqa: E402
                                       to_float64)

pytestmark = pytest.mark.emulator

DTYPES = planner.FLOAT_DTYPES
SEEDS = (0, 3, 11, 12345)


def acc_of(dtype):
    return np.float64 if dtype == "float64" else np.float32


def op(a, dtype=None):
    return planner.Operand.of(a, dtype if dtype == "bfloat16" else None)


def within(got, expected, tol, what):
    err = np.abs(np.asarray(got, np.float64) - expected)
    assert (err <= tol).all(), f"{what}: got {got}, expected {expected} (error {err}, tolerance {tol})"


class Case:
    """Buffers of one training forward in emulator memory (x, y, saved stats, running stats, counter)."""

    def __init__(self, shape, x_dtype, r_dtype=None, p_dtype=None, *, seed=0, values="normal", data=None,
                 running=True, counter=True, use_weight=True, use_bias=True, x_offset=0, y_offset=0):
        rng = np.random.default_rng(seed)
        c = shape[1]
        self.shape, self.x_dtype = shape, x_dtype
        self.r_dtype = r_dtype or ("float64" if x_dtype == "float64" else "float32")
        self.p_dtype = p_dtype or self.r_dtype
        if data is not None:
            x = data
        elif values == "normal":
            x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, (1, c) + (1,) * (len(shape) - 2)) + \
                rng.standard_normal((1, c) + (1,) * (len(shape) - 2))
        elif values == "large_mean":
            x = 1e4 + 1e-2 * rng.standard_normal(shape)
        else:
            raise ValueError(values)
        self.x64 = quantize(x, x_dtype)[1]
        self.x = alloc(emulator, self.x64, x_dtype, x_offset)
        self.y = alloc_empty(emulator, shape, x_dtype, y_offset)
        acc = acc_of(x_dtype)
        self.save_mean = emulator.empty((c,), acc)
        self.save_invstd = emulator.empty((c,), acc)
        self.save_offset = emulator.empty((c,), acc)
        self.rm64 = quantize(rng.standard_normal(c) * 0.3, self.r_dtype)[1] if running else None
        self.rv64 = quantize(rng.uniform(0.5, 2.0, c), self.r_dtype)[1] if running else None
        self.rm = alloc(emulator, self.rm64, self.r_dtype) if running else None
        self.rv = alloc(emulator, self.rv64, self.r_dtype) if running else None
        self.nbt = emulator.array(np.array(5, np.int64)) if counter else None
        self.w64 = quantize(rng.standard_normal(c), self.p_dtype)[1] if use_weight else None
        self.b64 = quantize(rng.standard_normal(c), self.p_dtype)[1] if use_bias else None
        self.w = alloc(emulator, self.w64, self.p_dtype) if use_weight else None
        self.b = alloc(emulator, self.b64, self.p_dtype) if use_bias else None

    def plan(self, launcher, momentum=0.1, eps=1e-5, splits=None, threads=None, columns=None):
        self.momentum, self.eps = momentum, eps
        maybe = lambda a, d: None if a is None else op(a, d)  # noqa: E731
        return planner.plan_batch_norm_train_forward(
            op(self.x, self.x_dtype), op(self.y, self.x_dtype), op(self.save_mean), op(self.save_invstd),
            maybe(self.rm, self.r_dtype), maybe(self.rv, self.r_dtype),
            None if self.nbt is None else planner.Operand.of(self.nbt),
            maybe(self.w, self.p_dtype), maybe(self.b, self.p_dtype), momentum, eps,
            device=launcher.device_info(), splits=splits, save_offset=op(self.save_offset),
            threads=threads if threads is not None else (32 if splits is not None and splits > 1 and not columns
                                                         else None), columns=columns)

    def run(self, launcher, momentum=0.1, eps=1e-5, splits=None, columns=None):
        self.nbt_before = None if self.nbt is None else int(self.nbt)
        self.rm_before = None if self.rm is None else to_float64(self.rm, self.r_dtype).copy()
        self.rv_before = None if self.rv is None else to_float64(self.rv, self.r_dtype).copy()
        plan = self.plan(launcher, momentum, eps, splits, columns=columns)
        launcher.launch(plan)
        return plan

    # results as float64
    def out(self):
        return to_float64(self.y, self.x_dtype)

    def running(self):
        return to_float64(self.rm, self.r_dtype), to_float64(self.rv, self.r_dtype)

    def bits(self):
        """Everything the launches wrote, as bytes (bitwise comparisons)."""
        parts = [self.y, self.save_mean, self.save_invstd, self.save_offset]
        parts += [a for a in (self.rm, self.rv, self.nbt) if a is not None]
        return [np.asarray(a).tobytes() for a in parts]

    def check(self, rtol_stats=None):
        """Assert y, saved statistics and running statistics against the float64 oracle."""
        x_dtype, shape = self.x_dtype, self.shape
        axes = (0,) + tuple(range(2, len(shape)))
        mean, var = (v.reshape(-1) for v in oracle.moments(self.x64, axes))
        y_ref, _, _ = oracle.batch_norm(self.x64, None, None, self.w64, self.b64, training=True, eps=self.eps)
        u = 2.0**-53 if x_dtype == "float64" else 2.0**-24
        n = self.x64.size // shape[1]
        # statistics: Welford in the accumulation dtype, a few ulps of the spread per log2(n) level
        spread = np.sqrt(var) + np.abs(mean)
        tol_stat = 64 * u * (1 + math.log2(max(n, 2))) * spread
        within(self.save_mean, mean, tol_stat, "save_mean")
        with np.errstate(divide="ignore"):
            invstd_ref = oracle._invstd(var, self.eps, True)
        np.testing.assert_allclose(self.save_invstd, invstd_ref, rtol=rtol_stats or 256 * u * (1 + math.log2(n)),
                                   atol=0)
        # output: rounding to the output dtype plus the accumulation error of each term
        bc = (1, -1) + (1,) * (len(shape) - 2)
        scale = invstd_ref * (np.abs(self.w64) if self.w64 is not None else 1.0)
        z = np.abs(self.x64 - mean.reshape(bc)) * scale.reshape(bc)
        rel = 256 * u * (1 + math.log2(n))
        b = np.abs(self.b64).reshape(bc) if self.b64 is not None else 0.0
        bound = (EPS[x_dtype] * np.abs(y_ref) + TINY[x_dtype] + rel * (z + (spread * scale).reshape(bc))
                 + 8 * u * b)
        err = np.abs(self.out() - y_ref)
        assert (err <= bound).all(), f"{x_dtype} {shape}: max error {err.max()} (bound {bound.min()})"
        if self.rm is not None:
            f = (1.0 / (self.nbt_before + 1)) if self.momentum is None else self.momentum
            exp_mean = (1 - f) * self.rm_before + f * mean
            exp_var = (1 - f) * self.rv_before + f * var * n / (n - 1)
            got_mean, got_var = self.running()
            ur = EPS[self.r_dtype]
            within(got_mean, exp_mean, 4 * ur * (np.abs(exp_mean) + spread) + tol_stat, "running_mean")
            within(got_var, exp_var, (4 * ur + 256 * u * (1 + math.log2(n))) * np.abs(exp_var) + TINY["float32"],
                   "running_var")
        if self.nbt is not None:
            assert int(self.nbt) == self.nbt_before + 1


# ------------------------------------------------------------------------------------ the oracle matrix

SHAPES = [
    (5, 7),           # (N, C): L = 1, one element per unit
    (64, 3),          # many short rows
    (3, 4, 11),       # NCL, odd sizes: partial vectors
    (2, 3, 5, 7),     # NCHW, odd sizes: row tails, misaligned rows
    (2, 3, 3, 4, 5),  # NCDHW
    (4, 6, 1, 1),     # spatial size 1
    (1, 3, 8, 8),     # batch 1 with spatial > 1
    (3, 2, 9),        # rows of 9: alternate rows misaligned
    (2, 5, 16),       # all vector accesses
    (6, 3, 40),       # several hundred values per channel
]


@pytest.mark.parametrize("splits", [None, 5], ids=["auto", "splits5"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_matches_oracle(x_dtype, shape, splits):
    """Planner's choice (one block per channel for these sizes) and 5 blocks of one warp per channel
    (Case.plan: 32 threads whenever splits > 1, so small groups spread over several blocks)."""
    case = Case(shape, x_dtype, seed=hash(shape) % 1000)
    plan = case.run(get_launcher(), splits=splits)
    assert len(plan) == 2
    if splits is None:
        assert plan[0].notes["splits"] == 1 and plan[0].workspace_bytes == 0
    else:
        assert plan[0].notes["splits"] == 5 and plan[0].workspace_bytes > 0 and plan[0].block == (32, 1, 1)
        units = shape[0] * -(-math.prod(shape[2:]) // planner.vector_width(x_dtype))
        assert plan[0].notes["busy_splits"] == min(5, -(-units // 32))
    case.check()


COLUMN_SHAPES = [(37, 70), (300, 130), (9, 300), (2, 64), (1000, 33)]


@pytest.mark.parametrize("splits", [None, 3, 40], ids=["auto", "splits3", "splits40"])
@pytest.mark.parametrize("shape", COLUMN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_column_kernel_matches_oracle(x_dtype, shape, splits):
    """(N, C) input through moments_columns: tiles of 32 * V channels (a partial last tile, rows that
    are not 16-byte aligned when C % V != 0), rows split over 1, 3 or 40 blocks (some empty)."""
    case = Case(shape, x_dtype, seed=shape[1])
    plan = case.run(get_launcher(), splits=splits, columns=True)
    assert plan[0].kernel.startswith("cupybn::moments_columns") and plan[0].block == (32, 8, 1)
    if splits is not None:
        assert plan[0].notes["splits"] == splits
    case.check()


def test_column_kernel_is_chosen_for_wide_nc_input():
    for dtype, c, expected in [("float32", 32, True), ("float32", 31, False), ("float16", 64, True),
                               ("float16", 63, False), ("float64", 16, True)]:
        x = planner.Operand(None, (100, c), (c, 1), dtype)
        acc = planner.Operand(None, (c,), (1,), planner.accumulation_dtype(dtype))
        plan = planner.plan_batch_norm_train_forward(x, x, acc, acc, None, None, None, None, None, 0.1, 1e-5)
        assert plan[0].notes["columns"] is expected, (dtype, c)
    x = planner.Operand(None, (100, 64, 2), (128, 2, 1), "float32")
    acc = planner.Operand(None, (64,), (1,), "float32")
    plan = planner.plan_batch_norm_train_forward(x, x, acc, acc, None, None, None, None, None, 0.1, 1e-5)
    assert not plan[0].notes["columns"]


@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_column_kernel_bitwise_repeatable(x_dtype):
    results = []
    for seed in SEEDS:
        case = Case((203, 100), x_dtype, seed=1)
        case.run(get_launcher(seed=seed), momentum=None, splits=5, columns=True)
        results.append(case.bits())
    assert all(r == results[0] for r in results)
    case.check()
    assert not get_launcher(seed=SEEDS[-1]).counters.any()


@pytest.mark.parametrize("x_dtype,r_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_running_and_parameter_dtypes(x_dtype, r_dtype):
    """Running statistics (updated in place) and affine parameters of any float dtype."""
    case = Case((3, 4, 10), x_dtype, r_dtype, r_dtype, seed=7)
    case.run(get_launcher(), splits=3)
    case.check()


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("running,counter,use_weight,use_bias", [
    (False, False, True, True), (True, False, False, True), (False, True, True, False), (True, True, False, False)])
def test_optional_arguments(x_dtype, running, counter, use_weight, use_bias):
    case = Case((4, 3, 13), x_dtype, running=running, counter=counter, use_weight=use_weight, use_bias=use_bias)
    case.run(get_launcher(), splits=2)
    case.check()


@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_misaligned_views(x_dtype):
    for xo, yo in [(1, 0), (0, 3), (3, 5)]:
        case = Case((3, 5, 13), x_dtype, x_offset=xo, y_offset=yo)
        case.run(get_launcher(), splits=4)
        case.check()


def test_planner_fills_the_gpu_for_few_channels():
    """C = 3 on a 132-SM GPU: the grid has hundreds of blocks, not 3; many blocks per channel."""
    x = planner.Operand(None, (64, 3, 224, 224), (3 * 224 * 224, 224 * 224, 224, 1), "float16")
    s = planner.Operand(None, (3,), (1,), "float32")
    (stats, norm) = planner.plan_batch_norm_train_forward(x, x, s, s, None, None, None, None, None, 0.1, 1e-5)
    assert stats.grid[0] >= 132 * 4 and stats.notes["splits"] * 3 == stats.grid[0]
    assert stats.block == (planner.MOMENTS_THREADS, 1, 1)
    # small problems get one block per channel
    x = planner.Operand(None, (4, 16, 3, 3), (144, 9, 3, 1), "float32")
    s = planner.Operand(None, (16,), (1,), "float32")
    (stats, _) = planner.plan_batch_norm_train_forward(x, x, s, s, None, None, None, None, None, 0.1, 1e-5)
    assert stats.notes["splits"] == 1 and stats.grid[0] == 16 and stats.workspace_bytes == 0


@pytest.mark.parametrize("shape", [(40, 2, 300), (3000, 3), (300, 5, 33)], ids=str)
@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32", "float64"])
def test_planned_splits_on_a_small_device(x_dtype, shape):
    """The planner's own choice of blocks per channel (several here: 4 SMs, few channels)."""
    launcher = get_launcher(sm_count=4)
    case = Case(shape, x_dtype, seed=2)
    plan = case.run(launcher)
    assert plan[0].notes["splits"] > 1
    case.check()


# ------------------------------------------------------------------------------------ determinism, workspace

@pytest.mark.parametrize("x_dtype", ["float16", "float32", "float64"])
def test_bitwise_repeatable_across_schedules(x_dtype):
    """Random block order and thread interleaving: statistics, running stats and y bit-identical,
    with many blocks per channel (the last block to finish differs between schedules)."""
    results = []
    for seed in SEEDS:
        case = Case((9, 3, 7, 11), x_dtype, seed=1)
        case.run(get_launcher(seed=seed), momentum=None, splits=6)
        results.append(case.bits())
    for r in results[1:]:
        assert r == results[0]
    case.check()


def test_counters_reset_and_reused():
    """The counters are zero after every launch (no memset needed), and the next launch reuses them."""
    launcher = get_launcher(seed=7)
    case = Case((8, 4, 10), "float32")
    case.run(launcher, splits=4)
    counters = launcher.counters
    assert counters is not None and not counters.any()
    first = case.bits()
    case.check()
    # second launch, same buffers: only the running stats / counter move on
    case.run(launcher, splits=4)
    assert launcher.counters is counters and not counters.any()
    case.check()
    assert case.bits()[:3] == first[:3]  # y and saved statistics identical
    # a launch with other channel counts and splits on the same counters
    other = Case((2, 33, 5), "bfloat16")
    other.run(launcher, splits=3)
    assert launcher.counters is counters and not counters.any()
    other.check()


def test_scratch_is_not_read_before_written():
    """Scratch is fresh 0xFF memory each launch; a read of an unwritten partial would give NaN."""
    launcher = get_launcher()
    case = Case((8, 2, 64), "float32")
    case.run(launcher, splits=7)
    assert launcher.last_scratch is not None
    case.check()


# ------------------------------------------------------------------------------------ multi-step sequences

@pytest.mark.parametrize("momentum", [0.1, None, 0.5])
@pytest.mark.parametrize("x_dtype,r_dtype", [("float32", "float32"), ("float16", "float32"), ("float64", "float64"),
                                             ("bfloat16", "bfloat16")])
def test_running_stats_over_steps(x_dtype, r_dtype, momentum):
    """Several training steps into the same running statistics (and counter, from 0)."""
    launcher = get_launcher(sm_count=2)
    c = 3
    rm = emulator.zeros((c,), planner.storage_dtype(r_dtype))
    rv = alloc(emulator, np.ones(c), r_dtype)
    nbt = emulator.zeros((), np.int64)
    ref = oracle.RunningStatsOracle(c, momentum)
    rng = np.random.default_rng(3)
    for step in range(4):
        shape = (4 + step, c, 6 + step)
        case = Case(shape, x_dtype, r_dtype, seed=step)
        case.rm, case.rv, case.nbt = rm, rv, nbt
        case.rm64 = case.rv64 = None
        case.run(launcher, momentum=momentum, splits=int(rng.integers(1, 4)))
        case.check()
        mean, var = (v.reshape(-1) for v in oracle.moments(case.x64, (0, 2)))
        n = case.x64.size // c
        ref.update(mean, var * n / (n - 1))
        assert int(nbt) == step + 1
        got_mean, got_var = case.running()
        tol = 8 * EPS[r_dtype] * (step + 1)
        np.testing.assert_allclose(got_mean, ref.mean, rtol=tol, atol=tol)
        np.testing.assert_allclose(got_var, ref.var, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------ edge cases

def test_empty_batch_moves_only_the_counter():
    launcher = get_launcher()
    c = 3
    x = emulator.zeros((0, c, 4), np.float32)
    y = emulator.zeros((0, c, 4), np.float32)
    sm, si = emulator.empty((c,), np.float32), emulator.empty((c,), np.float32)
    rm, rv = emulator.array(np.full(c, 0.25, np.float32)), emulator.array(np.full(c, 2.0, np.float32))
    nbt = emulator.array(np.array(3, np.int64))
    for momentum in (0.1, None):
        plan = planner.plan_batch_norm_train_forward(op(x), op(y), op(sm), op(si), op(rm), op(rv),
                                                     planner.Operand.of(nbt), None, None, momentum, 1e-5,
                                                     device=launcher.device_info())
        assert len(plan) == 1  # the statistics launch only (for the counter)
        launcher.launch(plan)
        assert (rm == 0.25).all() and (rv == 2.0).all()
    assert int(nbt) == 5
    assert planner.plan_batch_norm_train_forward(op(x), op(y), op(sm), op(si), op(rm), op(rv), None, None, None,
                                                 0.1, 1e-5) == ()
    # C == 0 as well
    z = emulator.zeros((0, 0, 4), np.float32)
    e = emulator.zeros((0,), np.float32)
    plan = planner.plan_batch_norm_train_forward(op(z), op(z), op(e), op(e), op(e), op(e), planner.Operand.of(nbt),
                                                 None, None, 0.1, 1e-5)
    launcher.launch(plan)
    assert int(nbt) == 6


def test_one_value_per_channel_is_refused_by_the_planner():
    x = planner.Operand(None, (1, 4), (4, 1), "float32")
    s = planner.Operand(None, (4,), (1,), "float32")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        planner.plan_batch_norm_train_forward(x, x, s, s, None, None, None, None, None, 0.1, 1e-5)


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_eps_zero_constant_channel_gives_bias(x_dtype):
    """var == 0 and eps == 0: invstd = 0, the channel normalizes to bias (ATen's rule)."""
    x = np.random.default_rng(0).standard_normal((4, 3, 6))
    x[:, 1] = 0.75
    case = Case((4, 3, 6), x_dtype, data=x)
    case.run(get_launcher(), eps=0.0, splits=2)
    assert case.save_invstd[1] == 0
    y = case.out()
    np.testing.assert_array_equal(y[:, 1], np.broadcast_to(quantize(case.b64[1], x_dtype)[1], y[:, 1].shape))
    case.check()


def test_large_mean_small_std():
    """float32, mean 1e4 and std 1e-2: Welford keeps the variance, (x - mean) stays exact."""
    case = Case((8, 3, 50), "float32", values="large_mean", use_weight=False, use_bias=False)
    case.run(get_launcher(), splits=4)
    y_ref, _, _ = oracle.batch_norm(case.x64, None, None, None, None, training=True, eps=case.eps)
    assert np.abs(case.out() - y_ref).max() <= 1e-3
    case.check(rtol_stats=1e-3)
    # the same through the column kernel ((N, C) input)
    case = Case((512, 40), "float32", values="large_mean", use_weight=False, use_bias=False)
    plan = case.run(get_launcher(), splits=3)
    assert plan[0].notes["columns"]
    y_ref, _, _ = oracle.batch_norm(case.x64, None, None, None, None, training=True, eps=case.eps)
    assert np.abs(case.out() - y_ref).max() <= 1e-3
    case.check(rtol_stats=1e-3)


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_nan_and_inf_propagate(x_dtype):
    """A NaN or Inf in a channel makes that channel's output NaN (as torch); others are unaffected."""
    import cupybn

    x = np.random.default_rng(5).standard_normal((3, 4, 5))
    x[1, 1, 2] = np.nan
    x[0, 2, 0] = np.inf
    x[2, 3, 4] = -np.inf
    case = Case((3, 4, 5), x_dtype, data=x)
    case.run(get_launcher(), splits=2)
    y = case.out()
    assert np.isnan(y[:, 1:]).all()
    assert np.isfinite(y[:, 0]).all()
    rm, rv = case.running()
    assert not np.isfinite(rm[1:]).any() and np.isfinite(rm[0])
    assert not np.isfinite(rv[1:]).any()
    # the CPU path agrees on where the output is NaN
    cpu = cupybn.batch_norm(x.astype(np.float32), None, None, training=True)
    assert (np.isnan(cpu) == np.isnan(y)).all()


def test_64bit_offsets():
    """Groups past element 2**31 of a huge logical tensor: only the far end is real (touched) memory.

    A = 2, C = 2**18 + 2, L = 4096 float32: 8 GiB of address space (MAP_NORESERVE, untouched); the
    launch covers the last two groups, whose elements sit at offsets a * C * L + c * L >= 2**31.
    32-bit index math would land outside the buffer (a guard-page fault) or on zero pages.
    """
    launcher = get_launcher()
    a, c, l = 2, 2**18 + 2, 4096
    total = a * c * l
    assert total > 2**31
    x = emulator.zeros((total,), np.float32)
    rng = np.random.default_rng(9)
    first = c - 2
    data = rng.standard_normal((a, 2, l)).astype(np.float32) * 2 + 3
    for i in range(a):
        start = (i * c + first) * l
        x[start:start + 2 * l] = data[i].reshape(-1)
    sm = emulator.zeros((c,), np.float32)
    si = emulator.zeros((c,), np.float32)
    xo = planner.Operand(x, (a, c, l), (c * l, l, 1), "float32")
    plan = planner.plan_moments(xo, (a, c, l), planner.Operand.of(sm), planner.Operand.of(si), 1e-5,
                                device=launcher.device_info(), splits=3, group_begin=first, groups=2)
    launcher.launch(plan)
    d = data.transpose(1, 0, 2).reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(sm[first:], d.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(si[first:], 1 / np.sqrt(d.var(axis=1) + 1e-5), rtol=1e-5)
    assert not sm[:first].any()


def test_instantiations_cover_every_dtype_combination():
    names = {k for _, k in planner.INSTANTIATIONS}
    for x, r in itertools.product(DTYPES, repeat=2):
        assert f"cupybn::moments_forward<{planner.cxx_type(x)}, {planner.cxx_type(r)}>" in names
        assert f"cupybn::moments_columns<{planner.cxx_type(x)}, {planner.cxx_type(r)}>" in names
    # batch norm's kernels (fused_groups.cu adds layer / group / instance norm's)
    assert len(planner.instantiations_for("moments.cu")) + len(planner.instantiations_for("batch_norm.cu")) == 64


# ------------------------------------------------------------------------------------ traffic

@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
@pytest.mark.parametrize("shape", [(8, 16, 32, 32), (64, 8, 100)], ids=str)
def test_two_launches_two_passes(x_dtype, shape):
    """Measured in the emulator: 2 launches, x read twice (statistics, normalize), y written once."""
    launcher = get_launcher()
    case = Case(shape, x_dtype)
    plan = case.plan(launcher, splits=4)
    with _track(case) as t:
        launcher.launch(plan)
    assert t.launches == 2
    assert t.passes("x") <= 2.0 and t.passes("y") <= 1.0
    case.nbt_before, case.rm_before, case.rv_before = 5, case.rm64, case.rv64
    case.check()


def _track(case):
    return get_launcher().module("moments.cu").track(x=case.x, y=case.y)


# ------------------------------------------------------------------------------------ layers on the emulated GPU path

@pytest.fixture
def emulated_gpu(monkeypatch):
    """cupybn's functional API and layers routing emulator-memory NumPy arrays to the GPU path,
    whose CuPy is replaced by emulator memory and whose launcher is the emulator's."""
    from test_cuda_launcher import _FakeCupy, _LauncherAdapter

    import cupybn._cuda as cuda_pkg  # noqa: F401
    from cupybn import _dispatch
    from cupybn._cuda import interop, launchers

    adapter = _LauncherAdapter(get_launcher(sm_count=2))
    adapter.plans = []
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy)
    monkeypatch.setattr(interop, "device_id", lambda x: 0)
    monkeypatch.setattr(launchers, "cupy_launcher", lambda: adapter)
    # The fake CuPy makes every ndarray look like a CuPy array: route and name devices by where
    # the memory lives, so that a plain NumPy array still takes the CPU path it is compared with.
    real_route, real_name = _dispatch.route, _dispatch.device_name

    def on_emulator(x):
        return isinstance(x, np.ndarray) and emulator._region(x.__array_interface__["data"][0]) is not None

    def route(x):
        if isinstance(x, np.ndarray):
            return "gpu" if on_emulator(x) else "cpu"
        return real_route(x)

    def device_name(x):
        if isinstance(x, np.ndarray):
            return "cuda:0" if on_emulator(x) else "cpu"
        return real_name(x)

    monkeypatch.setattr(_dispatch, "route", route)
    monkeypatch.setattr(_dispatch, "device_name", device_name)
    # Prepared calls are keyed by type (which decides the route in real use): add the memory.
    from cupybn import _prepared

    real_describe = _prepared.describe
    monkeypatch.setattr(_prepared, "describe", lambda a: (real_describe(a), route(a)) if isinstance(a, np.ndarray)
                        else real_describe(a))
    _prepared.cache.clear()
    yield adapter
    _prepared.cache.clear()


def _to_emulator(layer):
    """Put a layer's parameters and running statistics in emulator memory ("on the GPU"; the
    kernels update the statistics in place)."""
    for name in ("weight", "bias"):
        if getattr(layer, name, None) is not None:
            setattr(layer, name, emulator.array(getattr(layer, name)))
    st = layer._stats
    if st is not None:
        st.mean, st.var = emulator.array(st.mean), emulator.array(st.var)
        st.num_batches_tracked = emulator.array(st.num_batches_tracked)


@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (16, 5)), ("BatchNorm1d", (4, 5, 9)), ("BatchNorm1d", (50, 40)),
                                       ("BatchNorm2d", (3, 4, 6, 5)), ("BatchNorm3d", (2, 3, 3, 4, 5))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layers_match_the_cpu_path(emulated_gpu, cls, shape, momentum):
    import cupybn

    rng = np.random.default_rng(4)
    gpu = getattr(cupybn, cls)(shape[1], momentum=momentum)
    cpu = getattr(cupybn, cls)(shape[1], momentum=momentum)
    w, b = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    for layer in (gpu, cpu):
        layer.weight[...] = w
        layer.bias[...] = b
    _to_emulator(gpu)
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        y_gpu = gpu(emulator.array(x))
        y_cpu = cpu(x)
        assert len(emulated_gpu.plans[-1]) == 2
        np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(gpu.running_mean, cpu.running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gpu.running_var, cpu.running_var, rtol=1e-5, atol=1e-6)
        assert int(gpu.num_batches_tracked) == int(cpu.num_batches_tracked) == step + 1
    gpu.eval()
    cpu.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(gpu(emulator.array(x)), cpu(x), rtol=1e-5, atol=2e-5)
    assert len(emulated_gpu.plans[-1]) == 1


@pytest.mark.parametrize("x_dtype", ["float16", "float64"])
def test_functional_matches_the_cpu_path(emulated_gpu, x_dtype):
    import cupybn

    rng = np.random.default_rng(6)
    shape = (5, 3, 7)
    x = (rng.standard_normal(shape) * 2).astype(x_dtype)
    p = np.float64 if x_dtype == "float64" else np.float32
    rm_c, rv_c = np.zeros(3, p), np.ones(3, p)
    rm_g, rv_g = emulator.array(rm_c), emulator.array(rv_c)
    w = rng.standard_normal(3).astype(p)
    y_g = cupybn.batch_norm(emulator.array(x), rm_g, rv_g, emulator.array(w), None, training=True, momentum=0.3,
                            eps=1e-3)
    y_c = cupybn.batch_norm(x, rm_c, rv_c, w, None, training=True, momentum=0.3, eps=1e-3)
    tol = 1e-12 if x_dtype == "float64" else 2e-3
    np.testing.assert_allclose(np.asarray(y_g, np.float64), np.asarray(y_c, np.float64), rtol=tol, atol=tol)
    np.testing.assert_allclose(rm_g, rm_c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv_g, rv_c, rtol=1e-6, atol=1e-7)
    # batch statistics without running statistics; empty batch; one value per channel
    y_g = cupybn.batch_norm(emulator.array(x), None, None, training=True)
    np.testing.assert_allclose(np.asarray(y_g, np.float64),
                               np.asarray(cupybn.batch_norm(x, None, None, training=True), np.float64),
                               rtol=tol, atol=tol)
    empty = cupybn.batch_norm(emulator.zeros((0, 3, 7), x.dtype), rm_g, rv_g, training=True)
    assert empty.shape == (0, 3, 7)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cupybn.batch_norm(emulator.zeros((1, 3), x.dtype), rm_g, rv_g, training=True)


def test_layer_empty_batch_counts(emulated_gpu):
    import cupybn

    layer = cupybn.BatchNorm2d(3)
    _to_emulator(layer)
    y = layer(emulator.zeros((0, 3, 4, 4), np.float32))
    assert y.shape == (0, 3, 4, 4)
    assert int(layer.num_batches_tracked) == 1
    assert (layer.running_mean == 0).all() and (layer.running_var == 1).all()


# ------------------------------------------------------------------------------------ broken kernels

# (text in kernels/moments.cu, replacement, what breaks)
MUTATIONS = {
    "counter_not_reset": ("    if (tid == 0) counters[slot] = 0u;", "",
                          "the per-group ticket counter is left non-zero: the next launch never finalizes"),
    "combine_from_last_block": ("      for (int s = tid; s < splits; s += 32) {",
                                "      for (int s0 = tid; s0 < splits; s0 += 32) {"
                                " const int s = (s0 + split) % splits;",
                                "the last block folds the partials starting at its own: order depends on timing"),
    "no_pivot": ("pivot = convert<A>(__ldg(x + c * L));", "pivot = A(0);",
                 "Welford on unshifted data: a float32 mean of 1e4 is off by ~0.1 std"),
}


def _mutated(tmp_path, name):
    import shutil

    from cupybn._cuda import source
    from emulator.launcher import EmulatorLauncher

    old, new, _ = MUTATIONS[name]
    folder = tmp_path / name
    shutil.copytree(source.kernel_dir(), folder)
    text = (folder / "moments.cu").read_text()
    assert text.count(old) == 1, f"mutation {name!r} no longer applies; update MUTATIONS"
    (folder / "moments.cu").write_text(text.replace(old, new))

    class MutatedLauncher(EmulatorLauncher):
        """Only moments.cu is mutated, and only its float32 instantiation is built (build time)."""

        def module(self, source_name):
            if source_name != "moments.cu":
                return get_launcher().module(source_name)
            if source_name not in self._modules:
                self._modules[source_name] = emulator.build(
                    folder / source_name, kernels=["cupybn::moments_forward<float, float>"],
                    include_dirs=[str(folder)])
            return self._modules[source_name]

    return MutatedLauncher(kernel_dir=folder, device=planner.DeviceInfo(sm_count=132))


def _checks(launcher, values="normal"):
    """Two launches on the same counters against the oracle, then bitwise equality across schedules."""
    for _ in range(2):
        case = Case((8, 3, 50), "float32", values=values, use_weight=False, use_bias=False)
        case.run(launcher, splits=4)
        case.check(rtol_stats=1e-3 if values == "large_mean" else None)
        assert not launcher.counters.any()
    bits = []
    for seed in SEEDS:
        launcher.seed = seed
        case = Case((9, 3, 7, 11), "float32", seed=1)
        case.run(launcher, splits=6)
        bits.append(case.bits())
    assert all(b == bits[0] for b in bits), "results differ between emulator schedules"


@pytest.mark.parametrize("name,values", [("counter_not_reset", "normal"), ("combine_from_last_block", "normal"),
                                         ("no_pivot", "large_mean")])
def test_broken_kernel_fails(tmp_path, name, values):
    """The checks that pass the real kernel fail deliberately broken copies of it."""
    from emulator.launcher import EmulatorLauncher

    _checks(EmulatorLauncher(device=planner.DeviceInfo(sm_count=132)), values)
    with pytest.raises((AssertionError, emulator.CudaCpuError)) as info:
        _checks(_mutated(tmp_path, name), values)
    print(f"\n{name} ({MUTATIONS[name][2]}): {type(info.value).__name__}: {str(info.value).splitlines()[0][:160]}")
