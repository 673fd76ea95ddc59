"""Self-tests of the CUDA emulator (tests/emulator/): every bug in broken_kernels.cu is reported or exposed,
the correct kernels in good_kernels.cu pass under many schedules with identical results, traffic counting,
conversions, argument checking, cooperative launches, and the build machinery."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import emulator

pytestmark = pytest.mark.emulator

EMU_DIR = Path(emulator.__file__).resolve().parent
BROKEN = EMU_DIR / "broken_kernels.cu"
GOOD = EMU_DIR / "good_kernels.cu"
SEEDS = (0, 1, 2, 3, 7)

GOOD_KERNELS = [
    "good::block_reduce", "good::last_block_sum", "good::coop_normalize", "good::coop_atomic_count",
    "good::coop_flag_handoff", "good::copy", "good::scale", "good::coop_read_twice", "good::coop_read_once",
    "good::record_order", "good::f32_to_f16", "good::f16_to_f32", "good::f32_to_bf16", "good::bf16_to_f32",
    "good::f64_to_f32", "good::f64_to_f16", "good::f64_to_bf16", "good::hfma_f16", "good::warp_semantics",
    "good::uninit_shared", "good::dyn_smem_alias", "good::vec_scale<4>", "good::intrinsics", "gather_at",
    "many_types"]


@pytest.fixture(scope="module")
def bad():
    names = re.findall(r"__global__ void (\w+)\(", BROKEN.read_text())
    return emulator.build(BROKEN, ["broken::" + n for n in names])


@pytest.fixture(scope="module")
def good():
    return emulator.build(GOOD, GOOD_KERNELS)


def site(tag):
    """'broken_kernels.cu:<line>' of the line carrying the comment '@tag'."""
    for i, line in enumerate(BROKEN.read_text().splitlines(), 1):
        if re.search(r"@%s\b" % re.escape(tag), line):
            return "broken_kernels.cu:%d" % i
    raise LookupError(tag)


def raises(kernel, *args, match, **kw):
    with pytest.raises(emulator.CudaCpuError) as ei:
        kernel(*args, **kw)
    msg = str(ei.value)
    for m in [match] if isinstance(match, str) else match:
        assert m in msg, "%r not in %r" % (m, msg)
    return msg


# ================================================================================ bug catalogue
def test_missing_syncthreads_gives_wrong_results(bad, good):
    x = bad.array(np.arange(512, dtype=np.float32))
    ref = [x[:256].sum(), x[256:].sum()]
    wrong = 0
    for seed in SEEDS:
        out = bad.zeros((2,), np.float32)
        bad["broken::missing_syncthreads"](2, 256, x, out, seed=seed)
        wrong += not np.array_equal(out, ref)
        part = good.zeros((2,), np.float32)
        good["good::block_reduce"](2, 256, x, part, 512, seed=seed)  # the correct reduction: always right
        assert np.array_equal(part, ref)
    assert wrong == len(SEEDS)


def test_early_return_before_barrier(bad):
    x, out = bad.array(np.ones(1000, np.float32)), bad.zeros((4,), np.float32)
    raises(bad["broken::early_return"], 4, 256, x, out, 1000,
           match=["barrier divergence", "exited while", "__syncthreads()", site("early-barrier")])


def test_divergent_barriers(bad):
    out = bad.zeros((256,), np.float32)
    raises(bad["broken::divergent_barriers"], 1, 256, out,
           match=["different barriers", site("div-A"), site("div-B")])


def test_warp_reduction_without_syncwarp(bad):
    x = bad.array(np.arange(32, dtype=np.float32))
    for seed in SEEDS:
        out = bad.zeros((1,), np.float32)
        bad["broken::warp_reduce_no_syncwarp"](1, 32, x, out, seed=seed)
        assert out[0] != 496.0, seed


def test_shuffle_after_lanes_exited(bad):
    x, out = bad.array(np.ones(1000, np.float32)), bad.zeros((1,), np.float32)
    raises(bad["broken::shfl_after_exit"], 4, 256, x, out, 1000,
           match=["__shfl_down_sync", "exited", site("shfl")])


def test_deadlock_is_reported(bad):
    raises(bad["broken::warp_vs_block"], 1, 64, bad.zeros((64,), np.float32), match=["deadlock", site("deadlock")])


@pytest.mark.parametrize("kernel,pattern", [("oob_read", r"out-of-bounds read at buffer #\d+ \+"),
                                            ("oob_underflow", r"out-of-bounds read at buffer #\d+ - 28 bytes"),
                                            ("oob_write", r"out-of-bounds write at buffer #\d+ \+ 4096 bytes")])
def test_out_of_bounds_hits_guard_page(bad, kernel, pattern):
    x, out = bad.array(np.ones(1000, np.float32)), bad.zeros((1024,), np.float32)
    args = (out, 1024) if kernel == "oob_write" else (x, out, 1000)
    msg = raises(bad["broken::" + kernel], 4 if kernel != "oob_write" else 1, 256, *args, seed=0, match="bytes")
    assert re.search(pattern, msg), msg
    assert re.search(r"at \S*broken_kernels\.cu:\d+ \(in broken::%s" % kernel, msg), msg  # symbolized pc
    if kernel == "oob_read":
        assert site("oob-read") in msg


def test_shared_array_index_out_of_bounds(bad):
    x, out = bad.array(np.ones(256, np.float32)), bad.zeros((256,), np.float32)
    raises(bad["broken::shared_oob"], 1, 256, x, out,
           match=["index 256 out of bounds for type 'float [256]'", site("shared-oob")])


def test_misaligned_vector_access(bad):
    x, out = bad.array(np.ones(256, np.float32)), bad.zeros((32,), np.float32)
    raises(bad["broken::misaligned_float4"], 1, 32, x, out, 1,
           match=["misaligned address", "4 bytes past a multiple of 16", "float4", site("misaligned")])
    bad["broken::misaligned_float4"](1, 32, x, out, 4)  # 16-byte aligned offset: fine
    assert (out == 4.0).all()


def test_last_block_by_index_is_order_dependent(bad):
    x = bad.array(np.ones(2000, np.float32))
    results = []
    for seed in range(10):
        part, out = bad.zeros((8,), np.float32), bad.zeros((1,), np.float32)
        bad["broken::last_block_by_index"](8, 256, x, part, out, 2000, seed=seed)
        results.append(float(out[0]))
    assert results[0] == 2000.0  # in order (seed 0) the bug is invisible ...
    assert sum(r != 2000.0 for r in results[1:]) >= 6, results  # ... a random block order exposes it


def test_spin_wait_on_other_block(bad):
    k = bad["broken::spin_on_other_block"]
    out = bad.zeros((2,), np.float32)
    with bad.settings(timeout_ms=300):
        t = time.perf_counter()
        raises(k, 2, 32, bad.zeros((1,), np.uint32), out, seed=0, match=["watchdog", "thread (0,0,0)"])
        assert time.perf_counter() - t < 10
        k(2, 32, bad.zeros((1,), np.uint32), out, seed=0, cooperative=True)  # co-resident blocks: completes
        with bad.settings(workers=2):  # or blocks spread over two OS threads
            k(2, 32, bad.zeros((1,), np.uint32), out, seed=0)
    assert (out == 1.0).all()


def test_grid_sync_in_normal_launch(bad):
    raises(bad["broken::grid_sync_not_cooperative"], 2, 32, bad.zeros((64,), np.float32),
           match=["grid.sync()", "non-cooperative launch", site("grid-noncoop")])


@pytest.mark.parametrize("kernel,match", [
    ("grid_sync_block_skips", ["grid barrier divergence", "grid.sync()", site("grid-skip")]),
    ("grid_sync_thread_skips", ["barrier divergence", "exited while", "grid.sync()", site("grid-thread-skip")]),
    ("grid_sync_extra", ["grid barrier divergence", "grid.sync()"])])
def test_grid_sync_divergence(bad, kernel, match):
    for seed in (0, 3):
        raises(bad["broken::" + kernel], 4, 32, bad.zeros((128,), np.float32), seed=seed, cooperative=True,
               match=match)


def test_cooperative_block_limit(bad, good):
    raises(good["good::coop_atomic_count"], 65, 32, good.zeros((1,), np.uint32), good.zeros((65 * 32,), np.uint32),
           cooperative=True, match="too many blocks in cooperative launch")
    with good.settings(max_coop_blocks=65):
        seen = good.zeros((65 * 32,), np.uint32)
        good["good::coop_atomic_count"](65, 32, good.zeros((1,), np.uint32), seen, cooperative=True)
    assert (seen == 65 * 32).all()


def test_other_faults(bad):
    raises(bad["broken::int_div_zero"], 1, 32, bad.zeros((32,), np.int32), bad.zeros((32,), np.int32),
           match=["division by zero", "broken_kernels.cu"])
    raises(bad["broken::traps"], 1, 32, bad.zeros((32,), np.float32), match=["__trap()", site("trap")])
    raises(bad["broken::stack_overflow"], 1, 32, bad.zeros((32,), np.int32), 100000, match="stack overflow")
    out = bad.zeros((32,), np.int32)
    bad["broken::stack_overflow"](1, 32, out, 10)  # shallow recursion is fine (and the module still works)
    assert (out == sum(range(11))).all()


# ================================================================================ correct kernels
def test_block_reduce_identical_across_seeds(good):
    x = good.array(np.random.default_rng(0).standard_normal(100_000).astype(np.float32))
    outs = []
    for seed in SEEDS:
        part = good.empty((64,), np.float32)
        good["good::block_reduce"](64, 256, x, part, x.size, seed=seed)
        outs.append(part.copy())
    assert all(np.array_equal(o, outs[0]) for o in outs)
    assert abs(outs[0].astype(np.float64).sum() - x.astype(np.float64).sum()) < 1e-2


def test_last_block_combine_identical_across_seeds(good):
    x = good.array(np.random.default_rng(1).standard_normal(50_000).astype(np.float32))
    part, ticket = good.zeros((40,), np.float32), good.zeros((1,), np.uint32)
    outs = []
    for seed, workers in [(s, 1) for s in SEEDS] + [(5, 2), (6, 2)]:
        out = good.empty((1,), np.float32)
        with good.settings(workers=workers):
            good["good::last_block_sum"](40, 128, x, part, ticket, out, x.size, seed=seed)
        outs.append(out[0])
        assert ticket[0] == 0  # atomicInc wrapped around: reusable
    assert len({o.tobytes() for o in outs}) == 1
    assert abs(float(outs[0]) - x.astype(np.float64).sum()) < 1e-2


def test_cooperative_two_phase_identical_across_seeds(good):
    n = 10_000
    x = good.array(np.random.default_rng(2).uniform(0.5, 1.5, n).astype(np.float32))
    outs = []
    for seed in SEEDS:
        part, total, y = good.empty((6,), np.float32), good.empty((1,), np.float32), good.empty((n,), np.float32)
        good["good::coop_normalize"](6, 128, x, part, total, y, n, seed=seed, cooperative=True)
        outs.append((total.copy(), y.copy()))
    assert all(np.array_equal(t, outs[0][0]) and np.array_equal(y, outs[0][1]) for t, y in outs)
    np.testing.assert_allclose(outs[0][1], x / x.astype(np.float64).sum(), rtol=1e-5)


def test_cooperative_atomics_and_cross_block_flags(good):
    counter, seen = good.zeros((1,), np.uint32), good.zeros((8 * 64,), np.uint32)
    good["good::coop_atomic_count"](8, 64, counter, seen, seed=3, cooperative=True)
    assert (seen == 8 * 64).all()
    data, flag, out = good.zeros((64,), np.float32), good.zeros((1,), np.uint32), good.zeros((4 * 64,), np.float32)
    good["good::coop_flag_handoff"](4, 64, data, flag, out, seed=5, cooperative=True)
    assert (out.reshape(4, 64)[1:] == np.arange(1, 65, dtype=np.float32)).all()


def _orders(good, seed):
    ticket, order = good.zeros((1,), np.uint32), good.zeros((16,), np.uint32)
    per_thread = good.zeros((16 * 64,), np.uint32)
    good["good::record_order"](16, 64, ticket, order, per_thread, seed=seed)
    return order.copy(), per_thread.reshape(16, 64).copy()


def test_schedule_randomization(good):
    o0, t0 = _orders(good, 0)
    assert (o0 == np.arange(16)).all() and (t0 == np.arange(64)).all()  # seed 0: blocks in order, threads FIFO
    o1, t1 = _orders(good, 1)
    o2, _ = _orders(good, 2)
    assert sorted(o1) == list(range(16)) and not (o1 == o0).all() and not (o1 == o2).all()
    assert all(sorted(r) == list(range(64)) for r in t1) and not (t1 == t0).all()
    o1b, t1b = _orders(good, 1)
    assert (o1b == o1).all() and (t1b == t1).all()  # a seed is a reproducible schedule


def test_seed_from_environment(good):
    script = textwrap.dedent("""
        import json, sys, numpy as np, emulator
        m = emulator.build(sys.argv[1], json.loads(sys.argv[2]))
        ticket, order = m.zeros((1,), np.uint32), m.zeros((16,), np.uint32)
        m["good::record_order"](16, 64, ticket, order, m.zeros((16 * 64,), np.uint32))   # no seed given
        print(json.dumps(order.tolist()))
    """)
    env = dict(os.environ, PYTHONPATH=str(EMU_DIR.parent), CUPYBN_EMULATOR_SEED="7")
    r = subprocess.run([sys.executable, "-c", script, str(GOOD), json.dumps(GOOD_KERNELS)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == _orders(good, 7)[0].tolist()


def test_warp_intrinsics(good):
    out, bits = good.zeros((64 * 4,), np.float32), good.zeros((6,), np.uint32)
    good["good::warp_semantics"](1, 64, out, bits, seed=3)
    exp = np.zeros((64, 4), np.float32)
    for t in range(64):  # PTX shfl.sync semantics, with clamping to the segment of `width` lanes
        lane, base = t % 32, t - t % 32
        exp[t] = [base + 31 - lane, t - 3 if lane % 8 >= 3 else t, t + 5 if lane % 16 + 5 < 16 else t,
                  base + ((lane ^ 6) if (lane ^ 6) < (lane // 8) * 8 + 8 else lane)]
    assert (out.reshape(64, 4) == exp).all()
    assert list(bits) == [sum(1 << lane for lane in range(32) if lane % 3 == 0), 1, 0, 13, 1, 1]


def test_shared_memory_poisoned(good):
    o = good.zeros((128,), np.uint32)
    good["good::uninit_shared"](3, 64, o, -1, smem=256)
    assert (o == 0xFFFFFFFF).all()  # static and dynamic __shared__ read before any write
    fo = good.zeros((64,), np.float32)
    good["good::dyn_smem_alias"](1, 64, fo, smem=64 * 8)
    expect = (0.5 * ((np.arange(64) + 1) % 64)).astype(np.float64).view(np.uint32)[1::2]
    assert np.array_equal(fo.view(np.uint32), expect)  # extern __shared__ float[] and double[] alias
    assert (good.empty((10,), np.float32).view(np.uint32) == 0xFFFFFFFF).all()  # like stale device memory
    assert (good.zeros((10,), np.float32) == 0).all()


def test_intrinsics_and_by_value_struct(good):
    q = good.array(np.array([3, 4, 16, 25], np.float32))
    h = good.array(np.array([1.5, 2.25], np.float16))
    b = good.array(emulator.f32_to_bf16_bits(np.array([1.5], np.float32)))
    params = np.array((0.5, 10, 0.1), dtype=[("eps", "<f4"), ("n", "<i4"), ("momentum", "<f8")])
    counter, flags, out = good.zeros((4,), np.uint32), good.zeros((8,), np.int32), good.zeros((32,), np.float32)
    k = good["good::intrinsics"]
    assert k.signature == ("p:f32x4", "p:f16", "p:bf16", "s16", "i64", "p:u32", "p:i32", "p:f32")
    k(1, 64, q, h, b, params, (5 << 32) | 7, counter, flags, out, seed=2)
    expect = [0.75, 0.25, 28, 3.75, 3.0, np.float32(0.1), 3, 3, 25, 2.5, 0.5, 5, 5, np.float16(0.1), 1.5, 10.5, 496,
              4.0]
    np.testing.assert_array_equal(out[:18], np.array(expect, np.float32))
    assert list(flags) == [0, 0, 1, 1, 10, 1, 1, 64]
    assert list(counter) == [64, 0, 7, 42]


def test_signature_and_scalar_packing(good):
    k = good["many_types"]
    assert k.signature == ("p:f32", "p:f64", "p:bf16", "p:f16", "p:f32x4", "i32", "u32", "i64", "u64", "f32",
                           "f64", "b8", "f16", "bf16", "f32x2")
    a = good.zeros((10,), np.float32)
    k(1, 32, a, None, None, None, None, -3, 2 ** 32 - 1, -2 ** 40, 2 ** 40, np.float32(1.25), 0.5, True,
      2.5, 3.5, (1.0, 2.0))
    assert list(a) == [-3, 2 ** 32 - 1, -2 ** 40, 2 ** 40, 1.25, 0.5, 1, 2.5, 3.5, 21]


# ================================================================================ traffic
def test_traffic_one_pass(good):
    n = 40_000
    x, y = good.array(np.ones(n, np.float32)), good.zeros((n,), np.float32)
    with good.track(x=x, y=y) as t:
        good["good::copy"](16, 256, x, y, n)
    assert t.launches == 1
    assert t.passes("x") == 1.0 and t.passes("y") == 1.0
    assert t.log[0]["x"]["written_pages"] == 0 and t.log[0]["y"]["written_pages"] == t.log[0]["y"]["pages"]
    assert good.get("faults") > 0
    with good.track(x=x) as t2:
        pass
    assert t2.launches == 0


def test_traffic_two_passes(good):
    n = 40_000
    x, y, s = good.array(np.ones(n, np.float32)), good.zeros((n,), np.float32), good.zeros((16,), np.float32)
    with good.track(x=x, y=y) as t:
        good["good::block_reduce"](16, 256, x, s, n)  # pass 1 over x
        good["good::scale"](16, 256, x, s, y, n)  # pass 2 over x, writes y
    assert t.launches == 2
    assert t.passes("x") == 2.0 and t.passes("y") == 1.0
    assert t.log[0]["y"]["pages"] == 0  # the reduction does not touch y
    assert "good::scale" in t.table()


def test_traffic_counts_phases_of_cooperative_kernels(good):
    n = 6 * 128  # one element per thread
    x, y, part = good.array(np.ones(n, np.float32)), good.zeros((n,), np.float32), good.zeros((6,), np.float32)
    with good.track(x=x, y=y) as t:
        good["good::coop_read_twice"](6, 128, x, part, y, n, cooperative=True)  # re-reads x after grid.sync()
        good["good::coop_read_once"](6, 128, x, part, y, n, cooperative=True)  # keeps x in registers
    assert [r["x"]["bytes"] / x.nbytes for r in t.log] == [2.0, 1.0]
    assert [r["y"]["bytes"] / y.nbytes for r in t.log] == [1.0, 1.0]
    assert (y == 1 - 128).all()  # x - (block 0's sum): the kernels really ran


# ================================================================================ conversions
def _launch_cvt(mod, kernel, src, out_dtype):
    x = mod.array(src)
    y = mod.empty(src.shape, out_dtype)
    mod[kernel](128, 256, x, y, src.size)
    return y


def _float_samples(rng, n=200_000):
    return np.concatenate([
        (rng.standard_normal(n) * 10.0 ** rng.integers(-12, 8, n)).astype(np.float32),
        rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32),
        np.array([65504, 65519.99, 65520, 2 ** -24, 2 ** -25, 1.5 * 2 ** -25, 2 ** -14, 3e38, -3.4e38, np.inf,
                  -np.inf, 0.0, -0.0, np.nan], np.float32)])


def test_half_conversions_bit_exact(good):
    allh = np.arange(65536, dtype=np.uint16).view(np.float16)
    f = _launch_cvt(good, "good::f16_to_f32", allh, np.float32)
    ref = allh.astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(f.view(np.uint32)[~nan], ref.view(np.uint32)[~nan]) and np.isnan(f[nan]).all()
    vals = _float_samples(np.random.default_rng(3))
    h = _launch_cvt(good, "good::f32_to_f16", vals, np.float16)
    with np.errstate(over="ignore"):
        refh = vals.astype(np.float16)
    nan = np.isnan(vals)
    assert np.array_equal(h.view(np.uint16)[~nan], refh.view(np.uint16)[~nan])
    assert (h.view(np.uint16)[nan] == 0x7FFF).all()  # canonical NaN, as cvt.rn.f16.f32


def test_bf16_conversions_bit_exact(good):
    vals = _float_samples(np.random.default_rng(4))
    b = _launch_cvt(good, "good::f32_to_bf16", vals, np.uint16)
    assert np.array_equal(b, emulator.f32_to_bf16_bits(vals))
    finite = np.isfinite(vals) & (np.abs(vals) < 3.38e38)
    assert np.array_equal(b[finite], _bf16_reference(vals[finite].astype(np.float64)))
    back = _launch_cvt(good, "good::bf16_to_f32", b, np.float32)
    assert np.array_equal(back.view(np.uint32), b.astype(np.uint32) << 16)
    assert np.array_equal(emulator.bf16_bits_to_f32(b).view(np.uint32), back.view(np.uint32))


def _bf16_reference(v):
    """Round float64 values to bfloat16 (8 significant bits) by float64 arithmetic alone: independent of the
    bit tricks under test.  Returns bit patterns."""
    _, e = np.frexp(np.abs(v))
    q = np.ldexp(1.0, np.maximum(e - 8, -133))  # ulp at 8 significant bits; bfloat16 subnormals below 2^-126
    with np.errstate(over="ignore"):
        r = (np.round(v / q) * q).astype(np.float32)  # np.round: half to even; exact (power-of-two scaling)
    return (r.view(np.uint32) >> 16).astype(np.uint16)


def test_double_conversions_round_once(good):
    rng = np.random.default_rng(5)
    v = np.concatenate([rng.standard_normal(100_000) * 10.0 ** rng.integers(-10, 6, 100_000),
                        rng.uniform(-70000, 70000, 50_000),
                        # exact value just below a half midpoint that rounds *to* the midpoint in float:
                        # rounding twice (double -> float -> half) would give 1 + 2^-9
                        [1 + 3 * 2.0 ** -11 - 2.0 ** -40, -(1 + 3 * 2.0 ** -11 - 2.0 ** -40),
                         1 + 2.0 ** -8 + 2.0 ** -40]])
    f = _launch_cvt(good, "good::f64_to_f32", v, np.float32)
    assert np.array_equal(f, v.astype(np.float32))
    h = _launch_cvt(good, "good::f64_to_f16", v, np.float16)
    with np.errstate(over="ignore"):
        assert np.array_equal(h.view(np.uint16), v.astype(np.float16).view(np.uint16))  # numpy: one rounding
    assert h[-3] == np.float16(1 + 2.0 ** -10)
    b = _launch_cvt(good, "good::f64_to_bf16", v, np.uint16)
    assert np.array_equal(b, _bf16_reference(v))
    assert b[-1] == _bf16_reference(np.array([1 + 2.0 ** -7]))[0]


def test_hfma_rounds_once(good):
    rng = np.random.default_rng(6)
    n = 50_000

    def halves(lo, hi):
        return (rng.uniform(1, 2, n) * 2.0 ** rng.integers(lo, hi, n) * rng.choice([-1, 1], n)).astype(np.float16)

    a, b, c = halves(-6, 6), halves(-6, 6), halves(-14, 14)
    # a*b + c = 1 + 3*2^-11 - 2^-26: fmaf would round to the midpoint 1 + 3*2^-11, then to even 1 + 2^-9
    a[0], b[0], c[0] = 1 + 2.0 ** -10, (1 - 2.0 ** -10) * 2.0 ** -6, 1 - 29 * 2.0 ** -11
    ha, hb, hc, y = good.array(a), good.array(b), good.array(c), good.empty((n,), np.float16)
    good["good::hfma_f16"](64, 256, ha, hb, hc, y, n)
    exact = a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)  # exact for these magnitudes
    assert np.array_equal(y.view(np.uint16), exact.astype(np.float16).view(np.uint16))
    assert y[0] == np.float16(1 + 2.0 ** -10)


# ================================================================================ arguments
def test_rejects_wrong_pointer_dtype(good):
    k = good["good::copy"]
    y = good.zeros((10,), np.float32)
    with pytest.raises(emulator.ArgumentError, match="float64"):
        k(1, 32, good.zeros((10,), np.float64), y, 10)
    with pytest.raises(TypeError):  # ArgumentError is also a TypeError (and a CudaCpuError)
        k(1, 32, good.zeros((10,), np.int32), y, 10)
    b = good["good::bf16_to_f32"]
    b(1, 32, good.zeros((10,), np.uint16), y, 10)  # bf16 pointers take uint16 bit patterns
    with pytest.raises(emulator.ArgumentError, match="uint16 bit patterns"):
        b(1, 32, good.zeros((10,), np.float16), y, 10)


def test_rejects_bad_arguments(good):
    k = good["good::copy"]
    x, y = good.zeros((10,), np.float32), good.zeros((10,), np.float32)
    with pytest.raises(emulator.ArgumentError, match="takes 3 arguments"):
        k(1, 32, x, y)
    with pytest.raises(emulator.ArgumentError, match="not in emulator memory"):
        k(1, 32, np.zeros(10, np.float32), y, 10)
    with pytest.raises(emulator.ArgumentError, match="C-contiguous"):
        k(1, 32, good.zeros((10, 2), np.float32)[:, 0], y, 10)
    with pytest.raises(emulator.ArgumentError, match="expected an integer"):
        k(1, 32, x, y, 10.0)
    with pytest.raises(emulator.ArgumentError, match="does not fit in i32"):
        k(1, 32, x, y, 2 ** 31)
    with pytest.raises(emulator.ArgumentError, match="expected an emulator array"):
        k(1, 32, [1.0], y, 10)
    with pytest.raises(emulator.ArgumentError, match="grid"):
        k((1, 2, 3, 4), 32, x, y, 10)
    k(1, 32, x, y, np.int64(10))  # numpy and Python ints are fine for i32
    with pytest.raises(emulator.CudaCpuError, match="invalid configuration"):
        k(1, 2048, x, y, 10)


def test_offset_views_and_alignment(good):
    n = 1000
    base = good.array(np.arange(n + 8, dtype=np.float32))
    for off in range(4):  # element offsets: the kernel's own alignment test picks the float4 or the scalar path
        x, y = base[off:off + n], good.zeros((n + 4,), np.float32)[1:n + 1]
        good["good::vec_scale<4>"](4, 256, x, y, n, 2.0)
        assert np.array_equal(y, 2 * np.arange(off, off + n, dtype=np.float32))
    odd = base.view(np.uint8)[2:2 + 4 * n].view(np.float32)  # byte offset 2: not a valid float*
    with pytest.raises(emulator.ArgumentError, match="4-byte aligned"):
        good["good::copy"](1, 32, odd, good.zeros((n,), np.float32), n)
    with pytest.raises(emulator.ArgumentError, match="16-byte aligned"):  # const float4* parameter
        good["good::intrinsics"](1, 64, base[1:5], None, None, b"\0" * 16, 0, None, None, None)


def test_kernel_lookup_and_settings(good):
    assert good["good::vec_scale< 4 >"] is good["good::vec_scale<4>"]  # whitespace-insensitive
    assert "good::copy" in good
    with pytest.raises(KeyError, match="not a kernel"):
        good["good::nope"]
    with pytest.raises(KeyError):
        good.set(bogus=1)
    before = good.get("timeout_ms")
    with good.settings(timeout_ms=1234, poison=0):
        assert good.get("timeout_ms") == 1234 and good.get("poison") == 0
    assert good.get("timeout_ms") == before and good.get("poison") == 1


# ================================================================================ building
def test_include_dirs_defines_and_templates(tmp_path):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "common.cuh").write_text("#pragma once\nnamespace lib { template <class T> __device__ T twice(T v) "
                                    "{ return v + v; } }\n")
    cu = tmp_path / "k.cu"
    cu.write_text(textwrap.dedent("""
        #include <cuda_runtime.h>
        #include "common.cuh"
        namespace ns {
        template <class T, int K>
        __global__ void fill(T* y, int n) {
          int i = blockIdx.x * blockDim.x + threadIdx.x;
          if (i < n) y[i] = lib::twice(T(K * OFFSET + __CUDA_ARCH__ / 100));
        }
        }
    """))
    exprs = ["ns::fill<float, 4>", "ns::fill<double, 2>"]
    mod = emulator.build(cu, exprs, include_dirs=[inc], defines=["OFFSET=10"])
    y32, y64 = mod.zeros((5,), np.float32), mod.zeros((5,), np.float64)
    mod["ns::fill<float, 4>"](1, 32, y32, 5)
    mod["ns::fill<double, 2>"](1, 32, y64, 5)
    assert (y32 == 2 * (40 + 8)).all() and (y64 == 2 * (20 + 8)).all()
    assert emulator.build(cu, exprs, include_dirs=[inc], defines=["OFFSET=10"]) is mod  # memoized
    (inc / "common.cuh").write_text("#pragma once\nnamespace lib { template <class T> __device__ T twice(T v) "
                                    "{ return v * 3; } }\n")
    mod2 = emulator.build(cu, exprs, include_dirs=[inc], defines=["OFFSET=10"])  # header changed: rebuilt
    assert mod2 is not mod
    mod2["ns::fill<float, 4>"](1, 32, y32, 5)
    assert (y32 == 3 * 48).all()


def test_lint_rejects_what_nvrtc_lacks(tmp_path):
    cu = tmp_path / "lint.cu"
    cu.write_text("#include <limits>\n// std::in a comment is fine\n"
                  "__global__ void k(float* y) { y[0] = std::numeric_limits<float>::max(); }\n")
    with pytest.raises(emulator.CudaCpuError) as ei:
        emulator.build(cu, ["k"])
    msg = str(ei.value)
    assert "lint.cu:1: #include <limits>" in msg and "lint.cu:3: uses the C++ standard library" in msg
    assert "lint.cu:2" not in msg
    mod = emulator.build(cu, ["k"], lint=False)  # the emulator itself could run it
    y = mod.zeros((1,), np.float32)
    mod["k"](1, 1, y)
    assert y[0] == np.finfo(np.float32).max


def test_build_errors_are_reported(tmp_path):
    cu = tmp_path / "bad.cu"
    cu.write_text("__global__ void k(float* y) { y[0] = undefined_thing; }\n")
    with pytest.raises(emulator.CudaCpuError, match="undefined_thing"):
        emulator.build(cu, ["k"])


def test_concurrent_builds_of_one_module(tmp_path):
    """Two processes building the same module into an empty cache both succeed (atomic renames)."""
    cu = tmp_path / "race.cu"
    cu.write_text("__global__ void inc(int* y) { y[threadIdx.x] += 1; }\n")
    script = textwrap.dedent("""
        import sys, numpy as np, emulator
        m = emulator.build(sys.argv[1], ["inc"])
        y = m.zeros((32,), np.int32)
        m["inc"](1, 32, y)
        assert (y == 1).all()
    """)
    env = dict(os.environ, PYTHONPATH=str(EMU_DIR.parent), CUPYBN_EMULATOR_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cu)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert len(list((tmp_path / "cache").glob("race-*.so"))) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "src"]  # temp dirs removed


def test_arrays_are_shared_between_modules(bad, good):
    x = good.array(np.ones(1000, np.float32))  # allocated "through" one module ...
    out = bad.zeros((1024,), np.float32)
    raises(bad["broken::oob_read"], 4, 256, x, out, 1000, seed=0, match="out-of-bounds read")  # ... known to all
    with bad.track(x=x) as t:
        good["good::copy"](4, 256, x, out, 1000)
    assert t.passes("x") == 1.0


# ================================================================================ 64-bit indexing
def test_64bit_indexing_aid(bad, good):
    """A > 2^31-element buffer costs only the pages that are touched, so 64-bit index arithmetic can be tested:
    32-bit overflow lands outside the buffer and is reported."""
    n = 2 ** 31 + 4096
    try:
        x = good.zeros((n,), np.float32)  # 8 GiB of address space, not of memory
    except MemoryError:
        pytest.skip("the OS refuses an 8 GiB MAP_NORESERVE mapping")
    base = 2 ** 31 + 100
    x[base:base + 64] = np.arange(64, dtype=np.float32)
    y = good.zeros((64,), np.float32)
    good["gather_at"](1, 64, x, y, base, 64)
    assert (y == np.arange(64)).all()
    row_len = 2 ** 15
    row = base // row_len  # row * row_len > 2^31: wraps in 32-bit arithmetic
    with pytest.raises(emulator.CudaCpuError, match="invalid read|out-of-bounds read"):
        bad["broken::gather_row_i32"](1, 32, x, y, row, row_len)
