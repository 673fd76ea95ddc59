"""Running statistics of the layers over multi-step train/eval sequences, against the oracle and torch.nn.

momentum 0.1 / 0.3 / None, affine on/off, track_running_stats on/off, eps 0 and 1e-5.
"""
import numpy as np
import pytest

import oracle
from conftest import (
    EPS,
    assert_close,
    dtype_name,
    is_backend,
    load_into_torch,
    make_input,
    require,
    round_to,
    set_layer_params,
    snapshot,
    spatial_for,
    to_backend,
    to_f64,
    to_numpy,
    torch,
)

BN_LAYERS = [("BatchNorm1d", 2), ("BatchNorm1d", 3), ("BatchNorm2d", 4), ("BatchNorm3d", 5)]
IN_LAYERS = [("InstanceNorm1d", 3), ("InstanceNorm2d", 4), ("InstanceNorm3d", 5)]


def worst(*dtypes):
    return max(dtypes, key=lambda d: EPS[d])


def _check_nbt(layer, expected):
    nbt = layer.num_batches_tracked
    if expected is None:
        assert nbt is None
        return
    assert isinstance(nbt, np.ndarray), f"num_batches_tracked is {type(nbt)}"
    assert nbt.shape == () and nbt.dtype == np.int64, f"num_batches_tracked {nbt.shape} {nbt.dtype}"
    assert int(nbt) == expected


def _check_stats(layer, orc, seed, what, dtype="float32"):
    if orc.running_mean is None:
        assert layer.running_mean is None and layer.running_var is None
        return
    assert isinstance(layer.running_mean, np.ndarray) and isinstance(layer.running_var, np.ndarray)
    assert dtype_name(layer.running_mean) == dtype
    assert_close(layer.running_mean, orc.running_mean, dtype, f"running_mean {what}", seed)
    assert_close(layer.running_var, orc.running_var, dtype, f"running_var {what}", seed)


@pytest.mark.parametrize("kind,rank", BN_LAYERS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_batchnorm_sequence(cupybn, backend, kind, rank, momentum, affine, track, eps, rng, seed):
    require(backend)
    C = 3
    layer = getattr(cupybn, kind)(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    sd = set_layer_params(layer, rng)
    orc = oracle.BatchNormOracle(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
                                 weight=sd.get("weight"), bias=sd.get("bias"), round_to=lambda a: round_to(a, "float32"))
    tl = None
    if torch is not None and eps > 0:
        tl = getattr(torch.nn, kind)(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
        load_into_torch(tl, layer.state_dict())
    shape = (6, C) + spatial_for(rank)
    nbt = 0
    for step, mode in enumerate(["train"] * 4 + ["eval"] * 2 + ["train", "eval"]):
        training = mode == "train"
        r = layer.train() if training else layer.eval()
        assert r is layer and layer.training is training
        orc.training = training
        if tl is not None:
            tl.train(training)
        x64 = make_input(rng, shape, "float32")
        if step == 2:
            x64[:, 1] = 0.75  # a constant channel: with eps=0 it normalizes to 0 (bias), not NaN
        y = layer(to_backend(x64, backend, "float32"))
        assert is_backend(y, backend) and dtype_name(y) == "float32" and tuple(y.shape) == shape
        ye = orc(x64)
        assert_close(y, ye, "float32", f"{kind} output step {step} ({mode})", seed)
        if training and track:
            nbt += 1
        _check_nbt(layer, nbt if track else None)
        _check_stats(layer, orc, seed, f"step {step}")
        if tl is not None:
            with torch.no_grad():
                yt = tl(torch.tensor(x64, dtype=torch.float32))
            assert_close(y, to_f64(yt), "float32", f"vs torch.nn step {step}", seed)
            if track:
                assert_close(layer.running_mean, to_f64(tl.running_mean), "float32", "running_mean vs torch", seed)
                assert_close(layer.running_var, to_f64(tl.running_var), "float32", "running_var vs torch", seed)
                assert int(layer.num_batches_tracked) == int(tl.num_batches_tracked)


@pytest.mark.parametrize("kind,rank", IN_LAYERS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_instancenorm_sequence(cupybn, backend, kind, rank, momentum, affine, track, batched, rng, seed):
    require(backend)
    C = 3
    layer = getattr(cupybn, kind)(C, momentum=momentum, affine=affine, track_running_stats=track)
    sd = set_layer_params(layer, rng)
    orc = oracle.InstanceNormOracle(C, momentum=momentum, affine=affine, track_running_stats=track,
                                    weight=sd.get("weight"), bias=sd.get("bias"),
                                    round_to=lambda a: round_to(a, "float32"))
    tl = None
    if torch is not None:
        tl = getattr(torch.nn, kind)(C, momentum=momentum, affine=affine, track_running_stats=track)
        load_into_torch(tl, layer.state_dict())
    shape = ((4, C) if batched else (C,)) + spatial_for(rank)
    for step, mode in enumerate(["train"] * 3 + ["eval"] * 2 + ["train"]):
        training = mode == "train"
        layer.train(training)
        assert layer.training is training
        orc.training = training
        if tl is not None:
            tl.train(training)
        x64 = make_input(rng, shape, "float32", per_channel=batched)
        y = layer(to_backend(x64, backend, "float32"))
        assert is_backend(y, backend) and tuple(y.shape) == shape
        assert_close(y, orc(x64, batched=batched), "float32", f"{kind} step {step} ({mode})", seed)
        if track:
            _check_nbt(layer, 0)  # InstanceNorm never increments it (torch)
            _check_stats(layer, orc, seed, f"step {step}")
            if momentum is None:  # None means 0: the running stats never move
                assert np.all(layer.running_mean == 0) and np.all(layer.running_var == 1)
        else:
            assert layer.running_mean is None and layer.num_batches_tracked is None
        if tl is not None:
            with torch.no_grad():
                yt = tl(torch.tensor(x64, dtype=torch.float32))
            assert_close(y, to_f64(yt), "float32", f"vs torch.nn step {step}", seed)
            if track:
                assert_close(layer.running_mean, to_f64(tl.running_mean), "float32", "running_mean vs torch", seed)
                assert_close(layer.running_var, to_f64(tl.running_var), "float32", "running_var vs torch", seed)


def test_momentum_none_is_cumulative_average(cupybn, backend):
    """Batches with means 1, 2, ..., 5 (exactly representable): running_mean is their average."""
    require(backend)
    layer = cupybn.BatchNorm1d(2, momentum=None)
    means, uvars = [], []
    for k in range(1, 6):
        x = np.array([[k - 1.0, 2 * k - 0.5], [k + 1.0, 2 * k + 0.5]], dtype=np.float32)
        means.append(x.mean(0))
        uvars.append(x.var(0, ddof=1))
        layer(to_backend(x, backend))
        assert int(layer.num_batches_tracked) == k
        np.testing.assert_allclose(layer.running_mean, np.mean(means, 0), rtol=1e-6)
        # cumulative average of (1, var_1, ..., var_k): factor 1/k, starting from 1 gets weight 0 at k=1
        np.testing.assert_allclose(layer.running_var, np.mean(uvars, 0), rtol=1e-6)
    np.testing.assert_allclose(layer.running_mean, [3.0, 6.0], rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, [2.0, 0.5], rtol=1e-6)


def test_num_batches_tracked_counts_training_calls_only(cupybn):
    layer = cupybn.BatchNorm2d(2)
    _check_nbt(layer, 0)
    x = np.random.default_rng(0).standard_normal((3, 2, 2, 2)).astype(np.float32)
    for k in range(3):
        layer(x)
    _check_nbt(layer, 3)
    layer.eval()
    layer(x)
    _check_nbt(layer, 3)
    layer.train()
    layer(x)
    _check_nbt(layer, 4)
    layer.reset_running_stats()
    _check_nbt(layer, 0)
    assert np.all(layer.running_mean == 0) and np.all(layer.running_var == 1)
    assert layer.running_mean.dtype == np.float32
    nt = cupybn.BatchNorm2d(2, track_running_stats=False)
    nt(x)
    assert nt.num_batches_tracked is None and nt.running_mean is None and nt.running_var is None
    inl = cupybn.InstanceNorm2d(2, track_running_stats=True)
    inl(x)
    inl(x)
    _check_nbt(inl, 0)


@pytest.mark.parametrize("kind,rank", BN_LAYERS + IN_LAYERS)
@pytest.mark.parametrize("momentum", [0.3, None])
def test_empty_batch_layers(cupybn, backend, kind, rank, momentum, rng, seed):
    """N = 0: empty output of the same shape, running stats unchanged; BatchNorm still counts the call."""
    require(backend)
    C = 3
    layer = getattr(cupybn, kind)(C, momentum=momentum, track_running_stats=True)
    shape = (5, C) + spatial_for(rank)
    layer(to_backend(make_input(rng, shape, "float32"), backend, "float32"))
    before = snapshot(layer.running_mean, layer.running_var)
    nbt = int(layer.num_batches_tracked)
    y = layer(to_backend(np.zeros((0, C) + spatial_for(rank), np.float32), backend))
    assert is_backend(y, backend) and tuple(y.shape) == (0, C) + spatial_for(rank)
    assert snapshot(layer.running_mean, layer.running_var) == before
    is_bn = kind.startswith("Batch")
    assert int(layer.num_batches_tracked) == nbt + (1 if is_bn else 0)
    if torch is not None and is_bn:
        # the same sequence in torch (which also counts the empty batch), then one more batch
        tl = getattr(torch.nn, kind)(C, momentum=momentum)
        x1 = make_input(rng, shape, "float32")
        tl.load_state_dict({k: torch.as_tensor(np.array(v, copy=True)) for k, v in layer.state_dict().items()})
        with torch.no_grad():
            yt = tl(torch.tensor(x1, dtype=torch.float32))
        y = layer(to_backend(x1, backend, "float32"))
        assert_close(y, to_f64(yt), "float32", "after empty batch", seed)
        assert_close(layer.running_mean, to_f64(tl.running_mean), "float32", "running_mean", seed)
        assert_close(layer.running_var, to_f64(tl.running_var), "float32", "running_var", seed)


@pytest.mark.parametrize("in_dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("layer_dtype", ["float16", "float32", "float64"])
def test_layer_mixed_precision_sequence(cupybn, backend, in_dtype, layer_dtype, rng, seed):
    """Output dtype = input dtype; state keeps the layer dtype; values follow the oracle computed
    from the rounded inputs, with the running stats rounded to the layer dtype after each update."""
    require(backend, in_dtype)
    C = 4
    layer = cupybn.BatchNorm2d(C, momentum=0.2, dtype=layer_dtype)
    sd = set_layer_params(layer, rng, affine_dtype=layer_dtype)
    assert layer.weight.dtype == np.dtype(layer_dtype)
    rnd = (lambda a: round_to(a, layer_dtype)) if layer_dtype != "float64" else None
    orc = oracle.BatchNormOracle(C, momentum=0.2, weight=sd["weight"], bias=sd["bias"], round_to=rnd)
    acc = "float64" if in_dtype == "float64" else "float32"  # accumulation precision (API.md)
    out_tol = worst(in_dtype, layer_dtype, acc)
    stat_tol = worst(layer_dtype, acc)
    k = 4 if out_tol != in_dtype else None  # a narrower state limits the accuracy of the output
    for step in range(4):
        training = step < 3
        layer.train(training)
        orc.training = training
        x64 = make_input(rng, (4, C, 3, 3), in_dtype)
        y = layer(to_backend(x64, backend, in_dtype))
        assert dtype_name(y) == in_dtype
        assert is_backend(y, backend)
        assert_close(y, orc(x64), out_tol, f"step {step}", seed, k=k)
        assert layer.running_mean.dtype == np.dtype(layer_dtype)
        assert_close(layer.running_mean, orc.running_mean, stat_tol, f"running_mean step {step}", seed, k=3)
        assert_close(layer.running_var, orc.running_var, stat_tol, f"running_var step {step}", seed, k=3)


# ============================================================================ RunningStats

def _owned_running_stats(cupybn, layer):
    found = [v for v in vars(layer).values() if isinstance(v, cupybn.RunningStats)]
    return found


def test_running_stats_is_exported_and_owned(cupybn):
    assert hasattr(cupybn, "RunningStats")
    layer = cupybn.BatchNorm1d(3, momentum=0.25)
    owned = _owned_running_stats(cupybn, layer)
    assert len(owned) == 1, "every layer that tracks statistics owns one RunningStats"
    rs = owned[0]
    for attr in ("mean", "var", "num_batches_tracked", "momentum"):
        assert hasattr(rs, attr), attr
    assert rs.momentum == 0.25
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    layer(x)
    np.testing.assert_array_equal(to_numpy(rs.mean), layer.running_mean)
    np.testing.assert_array_equal(to_numpy(rs.var), layer.running_var)
    assert int(to_numpy(rs.num_batches_tracked)) == 1
    for kind in ("InstanceNorm1d", "InstanceNorm2d"):
        assert len(_owned_running_stats(cupybn, getattr(cupybn, kind)(3, track_running_stats=True))) == 1
    assert len(_owned_running_stats(cupybn, cupybn.BatchNorm1d(3, track_running_stats=False))) == 0


# API.md names RunningStats and its attributes but not its methods; these follow the class's
# docstring: RunningStats(num_features, momentum=0.1), update(batch_mean, biased_batch_var, count),
# observe(x), reset().

@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_standalone_update(cupybn, momentum, rng, seed):
    rs = cupybn.RunningStats(3, momentum=momentum)
    assert isinstance(rs.mean, np.ndarray) and rs.mean.dtype == np.float32
    np.testing.assert_array_equal(rs.mean, np.zeros(3))
    np.testing.assert_array_equal(rs.var, np.ones(3))
    assert rs.num_batches_tracked.shape == () and rs.num_batches_tracked.dtype == np.int64
    assert int(rs.num_batches_tracked) == 0
    assert rs.momentum == momentum
    orc = oracle.RunningStatsOracle(3, momentum, round_to=lambda a: round_to(a, "float32"))
    mean_obj, var_obj = rs.mean, rs.var
    for k in range(5):
        n = int(rng.integers(2, 50))
        bm = rng.standard_normal(3).astype(np.float32)
        bv = rng.uniform(0.5, 2, 3).astype(np.float32)
        rs.update(bm, bv, n)
        orc.update(bm.astype(np.float64), bv.astype(np.float64) * n / (n - 1))
        assert int(rs.num_batches_tracked) == k + 1
        assert_close(rs.mean, orc.mean, "float32", f"mean step {k}", seed)
        assert_close(rs.var, orc.var, "float32", f"var step {k}", seed)
    assert rs.mean is mean_obj and rs.var is var_obj, "the update is in place"
    # an empty batch only moves the counter
    before = snapshot(rs.mean, rs.var)
    rs.update(np.zeros(3, np.float32), np.zeros(3, np.float32), 0)
    assert snapshot(rs.mean, rs.var) == before and int(rs.num_batches_tracked) == 6
    rs.reset()
    np.testing.assert_array_equal(rs.mean, np.zeros(3))
    np.testing.assert_array_equal(rs.var, np.ones(3))
    assert int(rs.num_batches_tracked) == 0


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_observe_matches_batchnorm(cupybn, backend, momentum, rng, seed):
    require(backend)
    rs = cupybn.RunningStats(4, momentum=momentum)
    layer = cupybn.BatchNorm2d(4, momentum=momentum)
    for k in range(3):
        x = to_backend(make_input(rng, (3, 4, 2, 5), "float32"), backend, "float32")
        rs.observe(x)
        layer(x)
        assert_close(rs.mean, to_f64(layer.running_mean), "float32", "mean", seed)
        assert_close(rs.var, to_f64(layer.running_var), "float32", "var", seed)
        assert int(rs.num_batches_tracked) == int(layer.num_batches_tracked) == k + 1
