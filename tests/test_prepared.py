"""Prepared calls (cupybn/_prepared.py, cupybn/_cuda/prepared.py): plan once per signature,
bind per call, change nothing on a failed call, share the cache between threads.

The GPU path runs on the host CuPy stand-in with a recording launcher (tests/fake_cupy.py): the
same prepared calls, planner and launch binding as on a GPU, no kernel executed. That the
prepared launches compute the right values is the emulator's part (test_cuda_*.py run every
norm through these prepared calls).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import cupybn
from cupybn import _prepared, native
from cupybn._cuda import interop

fake_cupy = pytest.importorskip("fake_cupy")


@pytest.fixture
def gpu(monkeypatch):
    """The GPU path on host memory; yields the recording launcher. The cache starts empty."""
    monkeypatch.setattr(interop, "device_id", lambda x: 0)
    _prepared.cache.clear()
    with fake_cupy.installed() as launcher:
        yield launcher
    _prepared.cache.clear()


def _dev(a):
    return fake_cupy.asarray(np.ascontiguousarray(a))


def _bn_args(rng, shape, dtype=np.float32):
    c = shape[1]
    return (_dev(rng.standard_normal(shape).astype(dtype)), _dev(np.zeros(c, np.float32)),
            _dev(np.ones(c, np.float32)), _dev(np.ones(c, np.float32)), _dev(np.zeros(c, np.float32)))


def _pointer(a):
    return a.__array_interface__["data"][0]


def test_second_call_with_the_same_signature_does_no_planning(gpu):
    rng = np.random.default_rng()
    x, rm, rv, w, b = _bn_args(rng, (4, 3, 5))
    cupybn.batch_norm(x, rm, rv, w, b, True)
    assert (_prepared.cache.misses, _prepared.cache.plans) == (1, 1)
    x2 = _dev(rng.standard_normal((4, 3, 5)).astype(np.float32))  # new data, same signature
    launches = gpu.launches
    y = cupybn.batch_norm(x2, rm, rv, w, b, True)
    assert (_prepared.cache.misses, _prepared.cache.plans, _prepared.cache.hits) == (1, 1, 1)
    assert gpu.launches == launches + 2
    # the launch was bound to this call's arrays, not the first call's
    kernel, grid, block, args, smem = gpu.last
    assert kernel.startswith("cupybn::batch_norm_normalize")
    assert _pointer(args[0]) == _pointer(x2) and _pointer(args[1]) == _pointer(y)
    assert _pointer(args[0]) != _pointer(x)


@pytest.mark.parametrize("change", ["shape", "strides", "dtype", "training", "affine", "running", "eps"])
def test_a_different_signature_gets_its_own_plan(gpu, change):
    rng = np.random.default_rng()
    x, rm, rv, w, b = _bn_args(rng, (4, 3, 5))
    cupybn.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    plans = _prepared.cache.plans
    args = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True, eps=1e-5)
    if change == "shape":
        args["input"] = _dev(rng.standard_normal((4, 3, 6)).astype(np.float32))
    elif change == "strides":
        args["input"] = fake_cupy.asarray(rng.standard_normal((4, 5, 3)).astype(np.float32)).transpose(0, 2, 1)
    elif change == "dtype":
        args["input"] = _dev(rng.standard_normal((4, 3, 5)).astype(np.float16))
    elif change == "training":
        args["training"] = False
    elif change == "affine":
        args["weight"] = None
    elif change == "running":
        args["running_mean"] = args["running_var"] = None
    else:  # a new eps is a new plan of the same prepared call (eps picks kernel arguments and paths)
        args["eps"] = 1e-3
    cupybn.batch_norm(**args)
    assert _prepared.cache.plans == plans + 1
    assert _prepared.cache.misses == (1 if change == "eps" else 2)


def test_layer_group_instance_norm_and_backward_plan_once(gpu):
    rng = np.random.default_rng()
    x = _dev(rng.standard_normal((2, 8, 16)).astype(np.float32))
    w, b = _dev(np.ones(16, np.float32)), _dev(np.zeros(16, np.float32))
    _, m, r = native.native_layer_norm(x, (16,), w, b)
    calls = [lambda: cupybn.layer_norm(x, (16,), w, b), lambda: cupybn.layer_norm(x, 16, w, b),
             lambda: cupybn.group_norm(x, 4, w[:8], b[:8]), lambda: cupybn.instance_norm(x),
             lambda: native.layer_norm_backward(x, x, (16,), m, r, w, b),
             lambda: native.batch_norm_backward(x, x, None, None, None, w[:8], b[:8], True)]
    for call in calls:
        call()
    plans = _prepared.cache.plans
    for call in calls:
        call()
    assert _prepared.cache.plans == plans


def test_a_failed_call_changes_neither_the_cache_nor_the_state(gpu):
    rng = np.random.default_rng()
    x, rm, rv, w, b = _bn_args(rng, (4, 3, 5))
    cupybn.batch_norm(x, rm, rv, w, b, True)
    entries, plans = len(_prepared.cache), _prepared.cache.plans
    before = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match="eps"):  # a per-call check on a cached signature
        cupybn.batch_norm(x, rm, rv, w, b, True, 0.1, -1.0)
    with pytest.raises(TypeError, match="momentum"):
        cupybn.batch_norm(x, rm, rv, w, b, True, "0.1")
    with pytest.raises(ValueError, match="weight"):  # a structural check: nothing stored
        cupybn.batch_norm(x, rm, rv, _dev(np.ones(4, np.float32)), b, True)
    with pytest.raises(TypeError, match="training"):
        cupybn.batch_norm(x, rm, rv, w, b, 1)
    assert (len(_prepared.cache), _prepared.cache.plans) == (entries, plans)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])


def test_failed_cpu_call_leaves_running_statistics_and_cache():
    _prepared.cache.clear()
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    cupybn.batch_norm(x, rm, rv, None, None, True)
    snapshot, entries = (rm.copy(), rv.copy()), len(_prepared.cache)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cupybn.batch_norm(x, rm, rv, None, None, True)
    rv.flags.writeable = True
    with pytest.raises(ValueError, match="eps"):
        cupybn.batch_norm(x, rm, rv, None, None, True, 0.1, -1e-5)
    np.testing.assert_array_equal(rm, snapshot[0])
    np.testing.assert_array_equal(rv, snapshot[1])
    assert len(_prepared.cache) == entries


def test_a_float_normalized_shape_is_never_served_from_an_int_entry():
    x = np.random.default_rng().standard_normal((2, 16)).astype(np.float32)
    cupybn.layer_norm(x, (16,))
    with pytest.raises(TypeError, match="normalized_shape"):
        cupybn.layer_norm(x, (16.0,))
    with pytest.raises(TypeError, match="num_groups"):
        cupybn.group_norm(x[:, :, None], 4.0)


def test_the_cache_is_bounded_and_least_recently_used_goes_first(monkeypatch):
    monkeypatch.setattr(_prepared, "cache", _prepared.PreparedCache(2))
    rng = np.random.default_rng()
    xs = [rng.standard_normal((2, 4, n)).astype(np.float32) for n in (3, 5, 7)]
    cupybn.instance_norm(xs[0])
    cupybn.instance_norm(xs[1])
    cupybn.instance_norm(xs[0])  # most recent: xs[1] is evicted next
    cupybn.instance_norm(xs[2])
    assert len(_prepared.cache) == 2 and _prepared.cache.misses == 3
    cupybn.instance_norm(xs[0])
    assert _prepared.cache.misses == 3
    cupybn.instance_norm(xs[1])
    assert _prepared.cache.misses == 4


def test_two_threads_sharing_the_cache_get_correct_results():
    from oracle import batch_norm, layer_norm

    _prepared.cache.clear()
    rng = np.random.default_rng()
    inputs = [rng.standard_normal(shape).astype(np.float32) * 3 + 1 for shape in ((8, 4, 6), (5, 4, 6), (8, 4, 6))]
    errors = []

    def work(seed):
        order = np.random.default_rng(seed).permutation(len(inputs) * 40) % len(inputs)
        try:
            for i in order:
                x = inputs[i]
                y = cupybn.batch_norm(x, None, None, training=True)
                np.testing.assert_allclose(y, batch_norm(x, training=True)[0], rtol=1e-4, atol=1e-5)
                z = cupybn.layer_norm(x, x.shape[1:])
                np.testing.assert_allclose(z, layer_norm(x, x.shape[1:]), rtol=1e-4, atol=1e-5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert _prepared.cache.misses <= 4 * 4  # each signature prepared at most once per thread
