"""cupybn._reference: the choice of centre in ``moments``, the (N, C) working view, and the block
machinery (aligned scratch, thread pool) -- each checked against the float64 oracle.

The functional tests cover the norms end to end; here the statistics are driven into each of
their paths on purpose and the path taken is asserted, so that a path that silently stopped
being used, or one that lost accuracy, fails.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import oracle
from conftest import assert_close, has_torch, make_input, require, round_to, to_backend, to_f64

from cupybn import _checks, _dispatch, _reference

DTYPES = ["float32", "float64"]


def _moments(backend, x64, dtype):
    x = to_backend(x64, backend, dtype)
    return _reference.moments(x)


def _expect(x64):
    mean, var = oracle.moments(x64, (0, 2))
    return mean.reshape(-1), var.reshape(-1)


def _check(m, x64, dtype, seed, what):
    mean, var = _expect(x64)
    scale = float(np.max(np.sqrt(var))) or 1.0
    assert_close(m.mean, mean, dtype, f"{what}: mean", seed, scale=max(1.0, float(np.max(np.abs(mean)))))
    assert_close(m.var, var, dtype, f"{what}: var", seed, scale=scale * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 5, 7), (300, 4, 1), (2, 3, 1000)], ids=str)
def test_centred_data_is_summed_around_zero(backend, dtype, shape, rng, seed, threads):
    """Means within a standard deviation of 0: no centred copy is made (centre 0 everywhere)."""
    require(backend, dtype)
    x64 = round_to(rng.standard_normal(shape) + rng.uniform(-0.5, 0.5, size=(1, shape[1], 1)), dtype)
    m = _moments(backend, x64, dtype)
    assert not np.any(to_f64(m.center)), "centre 0 expected for data centred near 0"
    _check(m, x64, dtype, seed, "near 0")


@pytest.fixture
def own_pool(monkeypatch):
    """A pool of the test's own (made on first use, after the test has set ``_WORKERS``), closed
    afterwards: a test that swapped pools used to leave the old one's threads idle for the rest of
    the run (nine ``cupybn-N`` threads on a 2-CPU machine)."""
    monkeypatch.setattr(_reference, "_pool", None)
    yield
    if _reference._pool is not None:
        _reference._pool.close()


@pytest.fixture(params=[False, True], ids=["serial", "threads"])
def threads(request, monkeypatch):
    """Run on one thread, or share every array's blocks with the pool (small blocks forced).
    Small (N, C) inputs take the side-by-side working view of large ones here (the functional
    tests cover them as they are)."""
    monkeypatch.setattr(_reference, "_TILE_MIN_ELEMENTS", 0)
    if request.param:
        monkeypatch.setattr(_reference, "_PARALLEL_MIN_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 5, 7), (300, 4, 1), (2, 3, 1000)], ids=str)
def test_far_from_zero_data_is_centred(backend, dtype, shape, rng, seed, threads):
    """Mean 1e4, std 1e-2: summed around a mean of the data, and as accurate as the oracle allows
    (the first block shows the data is far off, and the blocks after it stop early)."""
    require(backend, dtype)
    x64 = round_to(1e4 + 1e-2 * rng.standard_normal(shape), dtype)
    m = _moments(backend, x64, dtype)
    center = to_f64(m.center)
    assert np.all(np.abs(center - 1e4) < 1.0), center
    mean, var = _expect(x64)
    # The variance is ~1e-4 next to a mean of 1e4: the naive formula would lose every digit.
    np.testing.assert_allclose(to_f64(m.var), var, rtol=1e-3 if dtype == "float32" else 1e-9)
    np.testing.assert_allclose(to_f64(m.mean), mean, rtol=0, atol=3 * float(np.spacing(np.float32(1e4))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unrepresentative_first_rows_sum_again_around_the_mean(backend, dtype, rng, seed, monkeypatch, threads):
    """Batch norm decides from the first rows: here they sit at 0 and the rest at 1e3, so the sums
    around 0 fail the check on the totals and the statistics are taken again around the mean that
    pass found."""
    require(backend, dtype)
    monkeypatch.setattr(_reference, "_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(_reference, "_THREADED_BLOCK_MAX", 64)  # the first 10 rows, with the pool too
    x64 = rng.standard_normal((400, 3, 2))
    x64[40:] += 1e3
    x64 = round_to(x64, dtype)
    m = _moments(backend, x64, dtype)
    mean, var = _expect(x64)
    assert np.all(np.abs(to_f64(m.center) - mean) < 1e-2), (to_f64(m.center), mean)
    np.testing.assert_allclose(to_f64(m.var), var, rtol=1e-5 if dtype == "float32" else 1e-12)
    np.testing.assert_allclose(to_f64(m.mean), mean, rtol=1e-6 if dtype == "float32" else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_rows_far_from_zero_centre_every_block(backend, dtype, rng, seed, monkeypatch, threads):
    """Data at 1e3: no pass around 0 is kept; the centre is the first rows' mean, or the data's
    own mean when those rows were more than _ZERO_CENTER_LIMIT std off -- within that many
    standard deviations of the mean either way."""
    require(backend, dtype)
    monkeypatch.setattr(_reference, "_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(_reference, "_THREADED_BLOCK_MAX", 64)  # the first 10 rows, with the pool too
    x64 = round_to(1e3 + rng.standard_normal((400, 3, 2)), dtype)
    m = _moments(backend, x64, dtype)
    mean, var = _expect(x64)
    center = to_f64(m.center)
    assert np.all(np.abs(center - mean) <= 1.01 * _reference._ZERO_CENTER_LIMIT * np.sqrt(var)), (center, mean)
    np.testing.assert_allclose(to_f64(m.var), var, rtol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("shape", [(400, 3, 2), (40, 3, 50)], ids=["row blocks", "column blocks"])
def test_far_first_rows_stop_the_pass_around_zero(backend, shape, rng, seed, monkeypatch, threads):
    """Data at 1e3: the blocks holding the first rows see it and the pass around 0 stops there
    (a block or so per pool thread may be under way); every block is then summed once, centred.

    The pool's threads start a block after the first rows' check has run (or after 1 s), as they
    do unless the calling thread is descheduled meanwhile: on a busy machine the count would
    otherwise depend on the host's scheduler."""
    import threading

    require(backend, "float32")
    monkeypatch.setattr(_reference, "_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(_reference, "_THREADED_BLOCK_MAX", 64)
    checked = threading.Event()
    monkeypatch.setattr(_reference, "_near_zero",
                        lambda *args, _f=_reference._near_zero: (_f(*args), checked.set())[0])
    calls = {"raw": 0, "centred": 0}
    for name, kind in (("raw_sums", "raw"), ("centred_sums", "centred")):
        def counted(self, bounds, *args, _f=getattr(_reference._Grouped, name), _k=kind):
            if _k == "raw" and bounds[0] > 0 and not checked.wait(1.0):
                checked.set()  # (the check never came: count every block, do not wait again)
            calls[_k] += 1
            return _f(self, bounds, *args)
        monkeypatch.setattr(_reference._Grouped, name, counted)
    x64 = round_to(1e3 + rng.standard_normal(shape), "float32")
    m = _moments(backend, x64, "float32")
    blocks = _reference._Grouped(to_backend(x64, backend, "float32"), _reference._STATS_ROW_ELEMENTS).blocks
    first_rows = sum(1 for b in blocks if b[0] == 0)
    assert len(blocks) > 8 * _reference._WORKERS
    assert calls["raw"] <= first_rows + 2 * _reference._WORKERS, calls  # + 1 for the centre's rows
    assert calls["centred"] == len(blocks), calls
    mean, var = _expect(x64)
    np.testing.assert_allclose(to_f64(m.var), var, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_far_off_first_rows_centre_again(backend, dtype, rng, seed, monkeypatch, threads):
    """First rows at 0.5 with a tiny spread, the other 3990 at 1e4: centred on the first rows'
    mean (~20 std from the data's), the sums would lose ~9 bits; the check on the totals sends
    them round once more, around the mean."""
    require(backend, dtype)
    monkeypatch.setattr(_reference, "_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(_reference, "_THREADED_BLOCK_MAX", 64)
    x64 = 0.5 + 1e-3 * rng.standard_normal((4000, 3, 2))
    x64[10:] = 1e4 + 1e-2 * rng.standard_normal((3990, 3, 2))
    x64 = round_to(x64, dtype)
    m = _moments(backend, x64, dtype)
    mean, var = _expect(x64)
    assert np.all(np.abs(to_f64(m.center) - mean) <= np.sqrt(var)), (to_f64(m.center), mean)
    np.testing.assert_allclose(to_f64(m.var), var, rtol=1e-4 if dtype == "float32" else 1e-10)


def test_groups_decide_block_by_block(backend, rng, seed, monkeypatch):
    """Layer/instance/group norm views ``(1, groups, L)``: each block of whole groups takes its own
    path; centred and far-off groups in one call both come out right."""
    require(backend, "float32")
    monkeypatch.setattr(_reference, "_BLOCK_ELEMENTS", 256)
    x64 = rng.standard_normal((1, 12, 200))
    x64[0, 6:] = 5e3 + 1e-2 * x64[0, 6:]
    x64 = round_to(x64, "float32")
    m = _moments(backend, x64, "float32")
    center = to_f64(m.center)
    assert not np.any(center[:6]) and np.all(np.abs(center[6:] - 5e3) < 1.0), center
    mean, var = _expect(x64)
    np.testing.assert_allclose(to_f64(m.var)[:6], var[:6], rtol=2e-5)
    np.testing.assert_allclose(to_f64(m.var)[6:], var[6:], rtol=1e-3)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.95])
def test_zero_centre_accuracy_at_the_limit(backend, ratio, rng, seed):
    """Up to |mean| = _ZERO_CENTER_LIMIT std the sums around 0 lose at most 1 bit: float32 sums of
    n = 4096 squares carry ~sqrt(n) * eps = 4e-6 of rounding, at most doubled here."""
    require(backend, "float32")
    x64 = rng.standard_normal((4096, 6, 1))
    x64 = (x64 - x64.mean(axis=0)) / x64.std(axis=0) + ratio * _reference._ZERO_CENTER_LIMIT
    x64 = round_to(x64, "float32")
    m = _moments(backend, x64, "float32")
    assert not np.any(to_f64(m.center))
    mean, var = _expect(x64)
    np.testing.assert_allclose(to_f64(m.var), var, rtol=2 * 3 * np.sqrt(4096) * 2.0 ** -24)


def test_beyond_the_limit_is_centred(rng):
    """Just past the limit (|mean| = 1.05 _ZERO_CENTER_LIMIT std) the centred path is taken."""
    x64 = rng.standard_normal((2048, 3, 1))
    x64 = (x64 - x64.mean(axis=0)) / x64.std(axis=0) + 1.05 * _reference._ZERO_CENTER_LIMIT
    m = _reference.moments(x64.astype(np.float32))
    assert np.all(to_f64(m.center) != 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channels_have_zero_variance(backend, dtype, rng):
    """A constant channel always takes the centred path, where its variance is exactly 0."""
    require(backend, dtype)
    x64 = round_to(rng.standard_normal((500, 4, 3)), dtype)
    x64[:, 1] = 0.1
    x64[:, 3] = -7.25
    m = _moments(backend, x64, dtype)
    var = to_f64(m.var)
    assert var[1] == 0.0 and var[3] == 0.0, var


# ------------------------------------------------------------------------------ (N, C) working view

@pytest.mark.parametrize("a,c,tiles", [(4096, 512, 16), (4097, 512, 1), (10, 3, 10), (6, 9000, 1),
                                       (1024, 1000, 8), (7, 1, 7)])
def test_row_tiles(a, c, tiles):
    """Rows laid side by side: the largest divisor of N that keeps a row within 8192 elements."""
    assert _reference._row_tiles(a, c, 8192) == tiles
    assert a % tiles == 0 and (tiles == 1 or tiles * c <= 8192)


@pytest.mark.parametrize("shape,tiles", [((4096, 512, 1), 16), ((2048, 32, 1), 256), ((2000, 32, 1), 1),
                                         ((300, 4, 1), 1), ((4096, 512, 3), 1)], ids=str)
def test_small_inputs_keep_their_rows(shape, tiles):
    """Rows go side by side only from _TILE_MIN_ELEMENTS elements (below, the repeated vectors
    and the folding cost more than they save) and only where the view is flat."""
    assert _reference._layout(shape, 8192, _reference._settings()).tiles == tiles


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(4096, 512), (4097, 33), (300, 7), (6, 9000), (2, 1)], ids=str)
def test_batch_norm_on_n_c_inputs(cupybn, backend, dtype, shape, rng, seed, monkeypatch):
    """BatchNorm1d on (N, C) through the tiled working view, several blocks (small blocks forced):
    output and running statistics against the oracle; a second call is bitwise identical."""
    require(backend, dtype)
    monkeypatch.setattr(_reference, "_BLOCK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(_reference, "_TILE_MIN_ELEMENTS", 0)  # small inputs too
    x64 = make_input(rng, shape, dtype)
    c = shape[1]
    rm, rv = np.zeros(c), np.ones(c)
    RM, RV = to_backend(rm, backend, "float32"), to_backend(rv, backend, "float32")
    x = to_backend(x64, backend, dtype)
    y = cupybn.batch_norm(x, RM, RV, training=True, momentum=0.3)
    ye, rme, rve = oracle.batch_norm(x64, rm, rv, None, None, True, 0.3)
    assert_close(y, ye, dtype, "y", seed, k=3)
    assert_close(RM, rme, "float32", "running_mean", seed, k=2)
    assert_close(RV, rve, "float32", "running_var", seed, k=2)
    y2 = cupybn.batch_norm(x, None, None, training=True)
    assert np.array_equal(to_f64(y), to_f64(y2))


# ------------------------------------------------------------------------------ block machinery

@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (1000, 7), (2, 3, 4)], ids=str)
def test_empty_aligned_numpy(dtype, shape):
    """NumPy buffers start on a 64-byte boundary (malloc gives 16), with the shape and dtype asked."""
    a = _dispatch.empty_aligned(_dispatch.namespace(np.zeros(1)), shape, np.dtype(dtype), np.zeros(1))
    assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.c_contiguous
    assert a.ctypes.data % 64 == 0


def test_empty_aligned_other_frameworks(has_torch):
    import array_api_strict as xps

    t = _dispatch.empty_aligned(_dispatch.namespace(has_torch.zeros(1)), (4, 5), has_torch.float32, has_torch.zeros(1))
    assert tuple(t.shape) == (4, 5) and t.dtype == has_torch.float32
    s = _dispatch.empty_aligned(xps, (4, 5), xps.float64, xps.zeros(1))
    assert s.shape == (4, 5) and s.dtype == xps.float64


def test_column_sums_of_squares(rng, has_torch):
    x = rng.standard_normal((37, 11)).astype(np.float32)
    np.testing.assert_allclose(_dispatch.column_sums_of_squares(x), (x.astype(np.float64) ** 2).sum(0), rtol=1e-6)
    assert _dispatch.column_sums_of_squares(has_torch.from_numpy(x)) is None


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_map_blocks_keeps_block_order(workers, monkeypatch, own_pool):
    """Results come back in block order whichever thread took which block; with the pool, the
    caller and the pool's threads share the blocks."""
    import threading
    import time

    monkeypatch.setattr(_reference, "_WORKERS", workers)
    monkeypatch.setattr(_reference, "_PARALLEL_MIN_ELEMENTS", 0)
    blocks = _reference._blocks((10, 3, 1 << 16))

    def fn(bounds):
        time.sleep(0.002)  # long enough for every thread to take some blocks
        return bounds, threading.get_ident()

    results = _reference._map_blocks(fn, blocks, 1 << 30)
    assert [b for b, _ in results] == blocks
    threads = {t for _, t in results}
    assert threading.get_ident() in threads
    assert len(threads) == workers


def test_map_blocks_raises_after_every_thread_is_done(monkeypatch, own_pool):
    """An error in one block reaches the caller; no pool thread is left writing results."""
    monkeypatch.setattr(_reference, "_WORKERS", 2)
    monkeypatch.setattr(_reference, "_PARALLEL_MIN_ELEMENTS", 0)
    blocks = _reference._blocks((10, 3, 1 << 16))

    def fn(bounds):
        if bounds[0] == 5:
            raise ValueError("block 5")
        return bounds

    with pytest.raises(ValueError, match="block 5"):
        _reference._map_blocks(fn, blocks, 1 << 30)


def test_dtype_names_across_frameworks(has_torch):
    """Cached dtype names: NumPy, torch and array-api-strict dtypes side by side, no warnings."""
    import array_api_strict as xps

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the second round is served from the cache
            assert _checks.dtype_name(np.dtype("float32")) == "float32"
            assert _checks.dtype_name(xps.float32) == "float32"
            assert _checks.dtype_name(has_torch.bfloat16) == "bfloat16"
            assert _checks.dtype_name(np.float64) == "float64"
            assert _checks.dtype_name(xps.float64) == "float64"


def test_device_names(has_torch):
    import array_api_strict as xps

    for _ in range(2):
        assert _dispatch.device_name(np.zeros(2)) == "cpu"
        assert _dispatch.device_name(xps.zeros(2)) == "cpu"
        assert _dispatch.device_name(has_torch.zeros(2)) == "cpu"


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_pool_works_in_a_forked_child(monkeypatch):
    """After fork (DataLoader workers), the child gets a pool of its own instead of waiting forever
    on the parent's threads."""
    import os

    monkeypatch.setattr(_reference, "_PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_reference, "_WORKERS", 2)
    blocks = _reference._blocks((10, 3, 1 << 16))
    assert _reference._map_blocks(lambda b: b, blocks, 1 << 30) == blocks  # the parent's pool runs
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the pooled map completes
        import signal

        signal.alarm(20)
        ok = _reference._map_blocks(lambda b: b, blocks, 1 << 30) == blocks
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_pool_shared_by_concurrent_callers(monkeypatch, own_pool):
    """Two user threads mapping at once share the pool's threads: each call returns only once its
    own blocks are done, whatever the other call's blocks are doing (a call that took the other's
    end for its own would return with blocks still missing)."""
    import threading
    import time

    monkeypatch.setattr(_reference, "_WORKERS", 3)  # two pool threads
    monkeypatch.setattr(_reference, "_PARALLEL_MIN_ELEMENTS", 0)
    blocks = _reference._blocks((10, 3, 1 << 16))
    slow_done = threading.Event()
    outcomes = {"slow": set(), "quick": set()}

    def slow():
        def fn(bounds):
            time.sleep(0.003)  # keeps a pool thread busy mid-block while the quick calls end
            return bounds
        for _ in range(10):
            outcomes["slow"].add(_reference._map_blocks(fn, blocks, 1 << 30) == blocks)
        slow_done.set()

    def quick():
        while not slow_done.is_set():
            outcomes["quick"].add(_reference._map_blocks(lambda b: b, blocks, 1 << 30) == blocks)

    threads = [threading.Thread(target=slow), threading.Thread(target=quick)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == {"slow": {True}, "quick": {True}}, outcomes


def test_closed_pool_leaves_no_thread(monkeypatch, own_pool):
    """close() ends every thread of a pool, after the work it was handed."""
    import threading

    monkeypatch.setattr(_reference, "_WORKERS", 3)
    monkeypatch.setattr(_reference, "_PARALLEL_MIN_ELEMENTS", 0)
    blocks = _reference._blocks((10, 3, 1 << 16))
    assert _reference._map_blocks(lambda b: b, blocks, 1 << 30) == blocks
    pool = _reference._pool
    assert len(pool.threads) == 2 and all(t.is_alive() for t in pool.threads)
    pool.close()
    assert not any(t.is_alive() for t in pool.threads)
    assert not any(t in threading.enumerate() for t in pool.threads)
