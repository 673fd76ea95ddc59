"""BatchNorm eval forward kernel, executed on the CPU through the CUDA emulator.

planner -> emulator launcher -> kernels/batch_norm.cu, compared with two NumPy oracles:

* the *kernel arithmetic* in the accumulation dtype (float32, or float64 for float64 input):
  ``invstd = 1/sqrt(var + eps)``, ``(x - mean) * (invstd * w) + b``, each operation rounded, then
  rounded to the output dtype (``x * (invstd * w) + (b - mean * invstd * w)``, torch's form, in a
  channel where ``mean * invstd * w`` is not finite: tests/test_eval_nan_rule.py). The kernel must
  match it bit for bit (the emulator computes IEEE float like NumPy; on a GPU the kernel pins every
  operation with the same rounding);
* the float64 formula, within a bound derived from the accumulation precision.

Also: 1 launch per call, x read once and y written once (page-granular traffic counters).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

emulator = pytest.importorskip("emulator")

from cupybn._cuda import planner  # noqa: E402
from emulator.launcher import EmulatorLauncher  # noqa: E402

pytestmark = pytest.mark.emulator

DTYPES = planner.FLOAT_DTYPES
# spacing at 1.0 and smallest subnormal of each dtype
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149, "float64": 5e-324}

_launchers = {}


def get_launcher(sm_count: int = 132, seed=None) -> EmulatorLauncher:
    """A launcher planning for ``sm_count`` SMs; all share one built module per kernel folder."""
    key = (sm_count, seed)
    if key not in _launchers:
        launcher = EmulatorLauncher(device=planner.DeviceInfo(sm_count=sm_count), seed=seed)
        if _launchers:  # reuse the first launcher's built modules
            launcher._modules = next(iter(_launchers.values()))._modules
        _launchers[key] = launcher
    return _launchers[key]


# ------------------------------------------------------------------------------------ data

def quantize(values, dtype):
    """float64 values -> (storage array, the float64 values it holds)."""
    if dtype == "bfloat16":
        bits = emulator.f32_to_bf16_bits(np.asarray(values, dtype=np.float32))
        return bits, emulator.bf16_bits_to_f32(bits).astype(np.float64)
    q = np.asarray(values).astype(dtype)
    return q, q.astype(np.float64)


def to_float64(storage, dtype):
    if dtype == "bfloat16":
        return emulator.bf16_bits_to_f32(storage).astype(np.float64)
    return np.asarray(storage).astype(np.float64)


def round_output(t, dtype):
    """Accumulation-dtype results -> output dtype, as float64 (round to nearest even)."""
    if dtype == "bfloat16":
        return emulator.bf16_bits_to_f32(emulator.f32_to_bf16_bits(t.astype(np.float32))).astype(np.float64)
    return t.astype(dtype).astype(np.float64)


def alloc(mod, values, dtype, offset=0):
    """A guarded emulator buffer holding ``values`` (already representable in ``dtype``), starting
    ``offset`` elements past a page boundary (offset > 0 makes it misaligned)."""
    storage, _ = quantize(values, dtype)
    buf = mod.empty((storage.size + offset,), storage.dtype)
    view = buf[offset:].reshape(storage.shape)
    view[...] = storage
    return view


def alloc_empty(mod, shape, dtype, offset=0):
    storage = planner.storage_dtype(dtype)
    buf = mod.empty((math.prod(shape) + offset,), storage)
    buf[...] = np.frombuffer(b"\xa5" * buf.nbytes, dtype=storage)  # garbage: unwritten elements show
    return buf[offset:].reshape(shape)


def make_inputs(shape, x_dtype, p_dtype, rng, values="normal"):
    c = shape[1]
    if values == "normal":
        x = rng.standard_normal(shape) * 3.0 + 0.5
        mean = rng.standard_normal(c) * 0.5
        var = rng.uniform(0.25, 4.0, c)
    elif values == "large_mean":  # mean 1e4, std 1e-2: the folded form would lose ~16 bits here
        x = 1e4 + 1e-2 * rng.standard_normal(shape)
        mean = np.full(c, 1e4)
        var = np.full(c, 1e-4)
    else:
        raise ValueError(values)
    weight = rng.standard_normal(c)
    bias = rng.standard_normal(c)
    return ({"x": quantize(x, x_dtype)[1]},
            {k: quantize(v, p_dtype)[1] for k, v in dict(mean=mean, var=var, weight=weight, bias=bias).items()})


# ------------------------------------------------------------------------------------ oracles

def kernel_arithmetic(x, p, eps, x_dtype, use_weight=True, use_bias=True):
    """The kernel's operations in NumPy, in the accumulation dtype, rounded to the output dtype."""
    acc = np.float64 if x_dtype == "float64" else np.float32
    bc = (1, -1) + (1,) * (x.ndim - 2)
    with np.errstate(all="ignore"):
        invstd = acc(1) / np.sqrt(p["var"].astype(acc) + acc(eps))
        scale = invstd * p["weight"].astype(acc) if use_weight else invstd
        shift = p["bias"].astype(acc) if use_bias else np.zeros_like(invstd)
        center = p["mean"].astype(acc)
        # torch's x * scale + (shift - center * scale) where center * scale is not finite (a zero
        # running variance with eps == 0): its NaN rule, not (x - center) * inf
        folded = center * scale
        odd = ~np.isfinite(folded)
        shift = np.where(odd, shift - folded, shift)
        center = np.where(odd, acc(0), center)
        t = (x.astype(acc) - center.reshape(bc)) * scale.reshape(bc) + shift.reshape(bc)
    return round_output(t, x_dtype)


def float64_formula(x, p, eps, use_weight=True, use_bias=True):
    bc = (1, -1) + (1,) * (x.ndim - 2)
    with np.errstate(all="ignore"):
        return _float64_formula(x, p, eps, use_weight, use_bias, bc)


def _float64_formula(x, p, eps, use_weight, use_bias, bc):
    invstd = 1.0 / np.sqrt(p["var"] + eps)
    w = p["weight"] if use_weight else 1.0
    b = p["bias"] if use_bias else 0.0
    return (x - p["mean"].reshape(bc)) * (invstd * w).reshape(bc) + np.broadcast_to(b, invstd.shape).reshape(bc)


def error_bound(x, p, eps, x_dtype, ref, use_weight=True, use_bias=True):
    """|kernel - float64 formula| bound: output rounding plus a few accumulation-dtype roundings of
    each term (parameters narrower than x, or wider and narrowed to float32, included)."""
    u = 2.0**-24 if x_dtype != "float64" else 2.0**-53
    bc = (1, -1) + (1,) * (x.ndim - 2)
    with np.errstate(all="ignore"):
        scale = np.abs(1.0 / np.sqrt(p["var"] + eps) * (p["weight"] if use_weight else 1.0)).reshape(bc)
    b = np.abs(p["bias"]).reshape(bc) if use_bias else 0.0
    compute = 8 * u * ((np.abs(x) + np.abs(p["mean"]).reshape(bc)) * scale + b)
    return EPS[x_dtype] * np.abs(ref) + TINY[x_dtype] + compute * (1 + EPS[x_dtype])


# ------------------------------------------------------------------------------------ the check

def run_eval(launcher, shape, x_dtype, p_dtype, *, use_weight=True, use_bias=True, eps=1e-5,
             x_offset=0, y_offset=0, values="normal", seed=0, data=None):
    """Plan and launch one eval forward on the emulator; returns (y as float64, inputs, plans)."""
    rng = np.random.default_rng(seed)
    xs, p = data if data is not None else make_inputs(shape, x_dtype, p_dtype, rng, values)
    mod = launcher.module("batch_norm.cu")
    x = alloc(mod, xs["x"], x_dtype, x_offset)
    y = alloc_empty(mod, shape, x_dtype, y_offset)
    bufs = {k: alloc(mod, v, p_dtype) for k, v in p.items()}
    op = planner.Operand.of
    dt = None if p_dtype != "bfloat16" else "bfloat16"
    plan = planner.plan_batch_norm_eval_forward(
        op(x, x_dtype if x_dtype == "bfloat16" else None), op(y, x_dtype if x_dtype == "bfloat16" else None),
        op(bufs["mean"], dt), op(bufs["var"], dt),
        op(bufs["weight"], dt) if use_weight else None, op(bufs["bias"], dt) if use_bias else None,
        eps, device=launcher.device_info())
    launcher.launch(plan)
    return to_float64(y, x_dtype), (xs["x"], p), plan


def check_eval_case(launcher, shape, x_dtype, p_dtype, **kw):
    """Run one case and assert both oracles; returns the plans (for extra assertions)."""
    use_weight, use_bias = kw.get("use_weight", True), kw.get("use_bias", True)
    eps = kw.get("eps", 1e-5)
    y, (x, p), plan = run_eval(launcher, shape, x_dtype, p_dtype, **kw)
    exact = kernel_arithmetic(x, p, eps, x_dtype, use_weight, use_bias)
    same = (y == exact) | (np.isnan(y) & np.isnan(exact))
    if not same.all():
        bad = np.argwhere(~same)[:5]
        raise AssertionError(f"{x_dtype}/{p_dtype} {shape}: {int((~same).sum())} of {y.size} elements differ from "
                             f"the kernel arithmetic, e.g. at {bad.tolist()}: got {y[tuple(bad[0])]!r}, "
                             f"expected {exact[tuple(bad[0])]!r}")
    ref = float64_formula(x, p, eps, use_weight, use_bias)
    finite = np.isfinite(ref)
    with np.errstate(all="ignore"):
        err = np.abs(y - ref)[finite]
        bound = error_bound(x, p, eps, x_dtype, ref, use_weight, use_bias)[finite]
    assert (err <= bound).all(), f"{x_dtype}/{p_dtype} {shape}: max error {err.max()} over the float64 formula"
    return plan


# ------------------------------------------------------------------------------------ tests

SHAPES = [
    (5, 7),           # (N, C): one channel per column, a thread's V columns span channels
    (64, 3),          # many short rows: block (1, 64)
    (3, 4, 11),       # NCL, odd sizes
    (2, 3, 5, 7),     # NCHW, odd sizes
    (2, 3, 3, 4, 5),  # NCDHW
    (4, 6, 1, 1),     # spatial size 1
    (1, 3, 8, 8),     # batch 1, rows a multiple of every vector width
    (3, 2, 9),        # rows of 18 elements: alternate rows misaligned for 16-byte vectors
    (2, 5, 16),       # inner a multiple of 8, 4 and 2: all vector accesses
    (1, 1, 1),        # one element
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_dtype,p_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_matches_oracle(x_dtype, p_dtype, shape):
    check_eval_case(get_launcher(), shape, x_dtype, p_dtype, seed=hash(shape) % 1000)


@pytest.mark.parametrize("x_offset,y_offset", [(1, 0), (0, 1), (1, 1), (3, 5)])
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_misaligned_views(x_dtype, x_offset, y_offset):
    """x / y views that start a few elements past a 16-byte boundary (element accesses where the
    pointer is misaligned, vectors where a row happens to be aligned again)."""
    p_dtype = "float32" if x_dtype != "float64" else "float64"
    check_eval_case(get_launcher(), (3, 5, 13), x_dtype, p_dtype, x_offset=x_offset, y_offset=y_offset)
    check_eval_case(get_launcher(), (2, 4, 16), x_dtype, p_dtype, x_offset=x_offset, y_offset=y_offset)


@pytest.mark.parametrize("use_weight,use_bias", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_optional_affine(x_dtype, use_weight, use_bias):
    check_eval_case(get_launcher(), (2, 3, 10), x_dtype, "float32", use_weight=use_weight, use_bias=use_bias)


@pytest.mark.parametrize("shape", [(40, 2, 300), (3000, 3), (1000, 7, 5)], ids=str)
@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32", "float64"])
def test_threads_loop_over_rows(x_dtype, shape):
    """Planned for a 1-SM device, each thread walks several rows with its cached channel math."""
    plan = check_eval_case(get_launcher(sm_count=1), shape, x_dtype, "float32")
    assert plan[0].notes["rows_per_thread"] > 1


@pytest.mark.parametrize("seed", [3, 11, 12345])
def test_any_block_order(seed):
    """Randomized block order and thread interleaving (emulator seed) give the same result."""
    check_eval_case(get_launcher(sm_count=1, seed=seed), (37, 3, 5, 7), "float16", "float32")


def test_large_mean_keeps_precision():
    """float32 channel with mean 1e4 and std 1e-2: subtracting the mean first is exact, so the
    output (order 1) is accurate to a few float32 ulps; the folded x*scale + shift would be off
    by about 1e4 * 100 * 2**-24 = 0.06."""
    launcher = get_launcher()
    check_eval_case(launcher, (4, 3, 50), "float32", "float32", values="large_mean")
    y, (x, p), _ = run_eval(launcher, (4, 3, 50), "float32", "float32", values="large_mean")
    ref = float64_formula(x, p, 1e-5)
    assert np.abs(y - ref).max() < 8 * 2.0**-23 * np.abs(ref).max()


def test_special_values():
    """inf, nan, signed zeros and subnormals in x; a zero running variance with eps = 0."""
    launcher = get_launcher()
    for x_dtype in DTYPES:
        tiny = TINY[x_dtype] * 3
        x = np.array([[np.inf, -np.inf, np.nan, 0.0, -0.0, tiny, -tiny, 1.0],
                      [1.0, 2.0, 3.0, -1.0, 0.5, tiny, 7.0, -0.0]]).reshape(2, 2, 4)
        p = {"mean": np.array([0.0, 1.0]), "var": np.array([1.0, 0.0]), "weight": np.array([1.0, 2.0]),
             "bias": np.array([0.0, -0.0])}
        xq = {"x": quantize(x, x_dtype)[1]}
        pq = {k: quantize(v, "float32")[1] for k, v in p.items()}
        for eps in (0.0, 1e-5):
            check_eval_case(launcher, (2, 2, 4), x_dtype, "float32", eps=eps, data=(xq, pq))


def test_subnormal_channel_is_not_flushed():
    """Subnormal inputs with mean 0, var 1 - eps and weight 1 come out unchanged (no flush to zero)."""
    launcher = get_launcher()
    for x_dtype in ("bfloat16", "float32"):
        x = np.array([1e-39, -3e-40, 2e-40, 5e-39] * 4).reshape(2, 1, 8)
        xq = {"x": quantize(x, x_dtype)[1]}
        pq = {"mean": np.zeros(1), "var": np.ones(1), "weight": np.ones(1), "bias": np.zeros(1)}
        y, _, _ = run_eval(launcher, (2, 1, 8), x_dtype, "float32", eps=0.0, data=(xq, pq))
        assert (y == xq["x"]).all() and (y != 0).all()


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_one_launch_one_pass(x_dtype):
    """Measured in the emulator: one launch; every page of x read and of y written, once."""
    launcher = get_launcher()
    mod = launcher.module("batch_norm.cu")
    shape = (8, 16, 32, 32) if x_dtype != "float64" else (4, 16, 32, 32)
    rng = np.random.default_rng(1)
    xs, p = make_inputs(shape, x_dtype, "float32", rng)
    x = alloc(mod, xs["x"], x_dtype)
    y = alloc_empty(mod, shape, x_dtype)
    bufs = {k: alloc(mod, v, "float32") for k, v in p.items()}
    op = planner.Operand.of
    bf = x_dtype if x_dtype == "bfloat16" else None
    plan = planner.plan_batch_norm_eval_forward(op(x, bf), op(y, bf), op(bufs["mean"]), op(bufs["var"]),
                                                op(bufs["weight"]), op(bufs["bias"]), 1e-5,
                                                device=launcher.device_info())
    with mod.track(x=x, y=y, **bufs) as t:
        launcher.launch(plan)
    print(f"\n{x_dtype} {shape}: grid {plan[0].grid} block {plan[0].block}; launches {t.launches}, "
          f"x passes {t.passes('x')}, y passes {t.passes('y')}, "
          f"params {[round(t.passes(k), 2) for k in bufs]}")
    assert t.launches == 1
    assert t.passes("x") == 1.0
    assert t.passes("y") == 1.0
    for k in bufs:
        assert t.passes(k) <= 1.0
    exact = kernel_arithmetic(xs["x"], p, 1e-5, x_dtype)
    got = to_float64(y, x_dtype)
    assert ((got == exact) | (np.isnan(got) & np.isnan(exact))).all()


def test_empty_input_launches_nothing():
    x = planner.Operand(None, (0, 3, 4), (12, 4, 1), "float32")
    vec = [planner.Operand(None, (3,), (1,), "float32") for _ in range(4)]
    assert planner.plan_batch_norm_eval_forward(x, x, *vec, eps=1e-5) == ()
